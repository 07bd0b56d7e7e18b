"""vLLM itself serves ptq's artifacts with the numerics ptq emulates (marker ``vllm``).

One vLLM process (CPU build, in ``.venv-vllm`` from ``make setup``) serves every artifact
of the module. For each scheme vLLM runs on CPU, the per-token log-probabilities vLLM
gives held-out token ids are compared with ptq's emulated model
(:func:`ptq.models.quantized_loader.load_quantized_model`, fp32).

Tolerance: vLLM on CPU computes in bf16 (activations, residual stream, attention; 8-bit
mantissa, relative rounding 2^-9 per operation) where the emulation computes in fp32. On
the FP model alone that is a mean |d log p| of ~0.01 nats on the tiny model below. Dynamic
activation quantization turns some of those bf16 roundings into whole-step code flips
(an INT8/FP8 step is 2^-7 to 2^-3 of the token's scale), and vLLM quantizes the FP8 KV
cache after RoPE where the emulation does it before: so weight-only schemes get the FP
noise bound, activation-quantized ones a larger one. Every comparison also checks that
the served model is much closer to the artifact's emulation than to a corrupted artifact
(all weight scales x 1.25): the tolerance cannot hide serving the wrong weights.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ptq.exporters.vllm_oracle import VllmError, VllmOracle
from ptq.exporters.vllm_support import CPU, layer_verdict
from ptq.models.quantized_loader import load_quantized_model
from ptq.plan import QuantPlan

pytestmark = pytest.mark.vllm

# (CLI flags, mean |d log p| bound, max bound) on the tiny model
SERVED = {
    "w4a16": (["--w4a16"], 0.03, 0.2),
    "w4a16_rotated": (["--w4a16", "--rotate"], 0.03, 0.2),
    "w4a16_awq_gptq": (["--w4a16", "--method", "awq+gptq"], 0.03, 0.2),
    "w4a16_stochastic": (["--w4a16", "--method", "rtn", "--rounding", "stochastic"], 0.03, 0.2),
    "w8a8": (["--w8a8"], 0.08, 0.5),
    "w8a8_static": (["--w8a8", "--act-format", "int8_tensor_static"], 0.12, 0.8),
    "fp8": (["--fp8"], 0.15, 1.0),
    "w4a16_kv_fp8": (["--w4a16", "--kv-cache", "fp8_e4m3"], 0.2, 1.2),
}
# What ptq predicts vLLM's CPU build refuses (vllm_support); checked against vLLM itself.
REFUSED = {
    "w4a8": ["--w4a8"],
    "w8a16": ["--w8a16"],
    "nvfp4": ["--weight-format", "nvfp4"],
    "mxfp4": ["--weight-format", "mxfp4"],
    "mxfp8": ["--weight-format", "mxfp8"],
    "fp8_weight_only": ["--fp8", "--act-format", "none"],
    "int2": ["--weight-format", "int2_g64"],
    "int3": ["--weight-format", "int3_g64", "--target", "ptq"],
    "lorc": ["--w4a16", "--lorc", "4", "--target", "ptq"],
    "kv_int8": ["--w4a16", "--kv-cache", "int8", "--target", "ptq"],
}


@pytest.fixture(scope="module")
def model(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_factory: Callable[..., Path]
) -> Path:
    """Tiny Llama vLLM's CPU attention accepts (head_dim 32) with peaked outputs."""
    return tiny_model_factory(
        tmp_path_factory.mktemp("vllm") / "llama",
        hidden_size=128,
        intermediate_size=256,
        initializer_range=0.1,
    )


@pytest.fixture(scope="module")
def ids() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 300, (4, 96), generator=g).tolist()


def _quantize(model: Path, out: Path, flags: list[str]) -> Path:
    from click.testing import CliRunner

    from ptq.cli import main

    args = ["quantize", str(model), *flags, "-o", str(out), "-q"]
    r = CliRunner().invoke(main, [*args, "--calib-samples", "4", "--calib-seqlen", "64"])
    assert r.exit_code == 0, r.output
    return out


def _emulated(folder: Path, ids: list[list[int]]) -> torch.Tensor:
    net, _ = load_quantized_model(folder)
    x = torch.tensor(ids)
    with torch.no_grad():
        logp = torch.log_softmax(net.eval()(input_ids=x).logits.float(), dim=-1)
    return logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]


def _corrupt_scales(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for k in [k for k in tensors if k.endswith(".weight_scale")]:
        tensors[k] = tensors[k] * 1.25
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("name", list(SERVED))
def test_vllm_serves_the_emulated_numerics(
    oracle: VllmOracle, model: Path, ids: list[list[int]], tmp_path: Path, name: str
) -> None:
    flags, mean_tol, max_tol = SERVED[name]
    out = _quantize(model, tmp_path / name, flags)
    loaded = oracle.load(out, max_model_len=128)
    assert loaded.dtype == "torch.bfloat16"  # vLLM's CPU build computes in bf16
    served = torch.tensor(oracle.prompt_logprobs(ids))
    d = (served - _emulated(out, ids)).abs()
    assert float(d.mean()) <= mean_tol and float(d.max()) <= max_tol, (d.mean(), d.max())
    oracle.load(_corrupt_scales(out, tmp_path / "corrupt"), max_model_len=128)
    wrong = (torch.tensor(oracle.prompt_logprobs(ids)) - _emulated(out, ids)).abs()
    assert float(wrong.mean()) > 3 * float(d.mean()), (wrong.mean(), d.mean())


def test_awq_output_is_plain_w4a16_to_vllm(
    oracle: VllmOracle, model: Path, ids: list[list[int]], tmp_path: Path
) -> None:
    """AWQ folds its scales into the FP weights and norms: the artifact has the layout,
    the config and the vLLM kernels of a plain W4A16 run (pack-quantized, no extra
    tensors), only other numbers."""
    plain = _quantize(model, tmp_path / "plain", ["--w4a16", "--method", "gptq"])
    awq = _quantize(model, tmp_path / "awq", ["--w4a16", "--method", "awq+gptq"])
    configs = [
        json.loads((d / "config.json").read_text())["quantization_config"] for d in (plain, awq)
    ]
    assert configs[0]["format"] == configs[1]["format"] == "pack-quantized"
    assert configs[0]["config_groups"] == configs[1]["config_groups"]
    tensors = [load_file(str(d / "model.safetensors")) for d in (plain, awq)]
    assert {k: v.shape for k, v in tensors[0].items()} == {
        k: v.shape for k, v in tensors[1].items()
    }
    assert any(not torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    schemes = [oracle.load(d, max_model_len=128).schemes for d in (plain, awq)]
    assert schemes[0] == schemes[1] and schemes[1], schemes


@pytest.mark.parametrize("name", list(REFUSED))
def test_vllm_cpu_refuses_what_ptq_says_it_refuses(
    oracle: VllmOracle, model: Path, tmp_path: Path, name: str
) -> None:
    out = _quantize(model, tmp_path / name, REFUSED[name])
    plan = QuantPlan.from_dict(json.loads((out / "ptq_plan.json").read_text()))
    lp = next(iter(plan))
    verdict = layer_verdict(lp.weight, lp.activation, lp.out_features, lp.in_features)
    refused_by_passes = name in ("lorc", "kv_int8")
    assert refused_by_passes or CPU not in verdict.devices, verdict
    with pytest.raises(VllmError):
        oracle.load(out, max_model_len=128)


def test_served_verdicts_are_cpu(model: Path, tmp_path: Path) -> None:
    """The schemes served above are the ones ptq's table says vLLM's CPU build serves."""
    for name, (flags, _, _) in SERVED.items():
        out = _quantize(model, tmp_path / name, flags)
        plan = QuantPlan.from_dict(json.loads((out / "ptq_plan.json").read_text()))
        for lp in plan:
            v = layer_verdict(lp.weight, lp.activation, lp.out_features, lp.in_features)
            assert CPU in v.devices, (name, lp.name, v)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["w4a16", "w8a8"])
def test_smollm2_perplexity_matches_under_vllm(
    oracle: VllmOracle, tmp_path: Path, scheme: str
) -> None:
    """SmolLM2-135M: vLLM's perplexity on held-out text within 1 % of ptq's emulated one
    (bf16 against fp32 moved it by 0.04-0.4 % in benchmarks/results/vllm_cpu.md)."""
    from ptq.api import quantize
    from ptq.evaluate import perplexity, tokenize_eval_text
    from ptq.models.paths import default_eval_file
    from ptq.models.source import resolve_model

    source = resolve_model("default", quiet=True)
    out = tmp_path / scheme
    quantize(source, scheme, output=out, progress=False, log=lambda *_: None)
    net, tok = load_quantized_model(out)
    tokens = tokenize_eval_text(tok, default_eval_file(), 2048)
    ours = perplexity(net.eval(), tokens, seqlen=512, progress=False)
    oracle.load(out, max_model_len=576)
    windows = [tokens[i * 512 : (i + 1) * 512].tolist() for i in range(4)]
    nll = [-lp for row in oracle.prompt_logprobs(windows) for lp in row]
    served = float(torch.tensor(nll).mean().exp())
    assert abs(served / ours - 1) < 0.01, (served, ours)
