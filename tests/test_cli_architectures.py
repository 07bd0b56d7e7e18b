"""The architecture matrix: every decoder family through ``ptq quantize``, end to end.

For tiny random-init Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3, OPT, GPT-2,
Mixtral and Qwen-MoE folders, each of ``--w4a8 --smoothquant --rotate --method gptq``
and ``--w4a16 --method gptq``: the output passes ``ptq verify``, compressed-tensors'
own decompressor gives the weights ``ptq eval``'s emulation uses bit for bit, the
output reloads and evaluates, and its logits stay near the FP model's on a fixed random
input. Separately, rotation and SmoothQuant leave the FP model's logits unchanged to
fp32 rounding, and Gemma 2/3 refuse ``--rotate`` naming the norm that prevents it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_archs import make_tiny_model, random_norms

from ptq.models.quantized_loader import load_quantized_model
from ptq.models.source import load_fp_model, resolve_model
from ptq.qlinear import QuantLinear
from ptq.verify import verify_output

ARCHS = [
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text",
    "phi3", "opt", "gpt2", "mixtral", "qwen2_moe",
]  # fmt: skip
NO_ROTATION = ("gemma2", "gemma3_text")  # post-norms write the residual stream
W4A8 = ("--w4a8", "--smoothquant", "--rotate", "--method", "gptq")
W4A16 = ("--w4a16", "--method", "gptq")
CALIB = ("--calib-samples", "4", "--calib-seqlen", "32", "-q")
ERROR_BOUND = 0.5  # relative logits error of a 4-bit tiny random model; observed <= 0.2

Run = Callable[..., Any]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    return {a: random_norms(make_tiny_model(root / a, a)) for a in ARCHS}


def _ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))


@cache
def _fp_logits(folder: Path) -> torch.Tensor:
    model, _ = load_fp_model(resolve_model(folder))
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _decompress(
    fmt_name: str, local: dict[str, torch.Tensor], group: dict[str, Any]
) -> torch.Tensor:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(
        targets=group["targets"],
        weights=group["weights"],
        input_activations=group["input_activations"],
    )
    out = BaseCompressor.get_value_from_registry(fmt_name).decompress(local, scheme)
    weight: torch.Tensor = out["weight"]
    return weight


def _check_output(out: Path, fp: torch.Tensor, text: Path, run_cli: Run) -> float:
    """verify, compressed-tensors bit-exactness, reload + eval; the relative logits error."""
    from ptq.models.checkpoint_names import CheckpointNames

    report = verify_output(out)
    plan = json.loads((out / "ptq_plan.json").read_text())
    assert report.layers == len(plan["layers"]) > 0
    model, _ = load_quantized_model(out)
    names = CheckpointNames.of(model)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(out / "model.safetensors"))
    checked = 0
    for group in qc["config_groups"].values():
        for name in group["targets"]:
            local = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
            layer = model.get_submodule(names.module_to_memory(name))
            assert isinstance(layer, QuantLinear), name
            assert torch.equal(_decompress(group["format"], local, group), layer.weight), name
            checked += 1
    assert checked == len(plan["layers"])
    head = model.get_output_embeddings().weight  # tied (Gemma 2/3, Llama here) or not
    zero_rows = int((head == 0).all(dim=1).sum())  # the padding token's, at most
    assert zero_rows <= 1, f"the LM head has {zero_rows} all-zero rows"
    with torch.no_grad():
        logits = model(input_ids=_ids()).logits
    r = run_cli(
        "eval", str(out), "--text", str(text), "--eval-tokens", "96", "--seqlen", "32", "-q"
    )
    assert r.exit_code == 0, r.output
    assert math.isfinite(float(r.output.split("perplexity: ")[1].split()[0]))
    return float((logits - fp).norm() / fp.norm())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pipeline", ["w4a8-sq-rot-gptq", "w4a16-gptq"])
def test_quantize_every_family(
    arch: str, pipeline: str, models: dict[str, Path], text_file: Path, run_cli: Run, tmp_path: Path
) -> None:
    flags = W4A8 if pipeline.startswith("w4a8") else W4A16
    if arch in NO_ROTATION:
        flags = tuple(f for f in flags if f != "--rotate")
    out = tmp_path / "out"
    r = run_cli(
        "quantize", str(models[arch]), *flags, "--calib", str(text_file), *CALIB, "-o", str(out)
    )
    assert r.exit_code == 0, r.output
    assert "runs on:" in r.output
    err = _check_output(out, _fp_logits(models[arch]), text_file, run_cli)
    print(f"\nmatrix {arch} {pipeline}: relative logits error {err:.4f}")
    assert err < ERROR_BOUND


@pytest.mark.parametrize("arch", NO_ROTATION)
def test_rotation_refused_naming_the_post_norm(
    arch: str, models: dict[str, Path], text_file: Path, run_cli: Run, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    r = run_cli(
        "quantize", str(models[arch]), *W4A8, "--calib", str(text_file), *CALIB, "-o", str(out)
    )
    assert r.exit_code == 2
    assert "error: rotation: rotation cannot be fused into this model" in r.output
    assert "model.layers.0.post_attention_layernorm" in r.output
    assert not out.exists()


def _transform_lazily(folder: Path, passes: list[Any], calib: torch.Tensor, out: Path) -> Path:
    """Run ``passes`` through the block-wise runner on the lazily read ``folder`` (as
    ``ptq quantize`` does) and write the transformed FP weights to ``out``."""
    from ptq.api import _plan_lazily
    from ptq.calibration.runner import RunSettings, run_passes
    from ptq.exporters.safetensors_export import TensorsWriter
    from ptq.exporters.shard_writer import ShardWriter
    from ptq.models.source import build_skeleton
    from ptq.models.weight_source import LazySource
    from ptq.pipeline import PassContext, QuantState
    from ptq.scheme import get_scheme

    source = resolve_model(folder)
    skeleton = build_skeleton(source)
    lazy = LazySource(source.path, skeleton)
    plan = _plan_lazily(lazy, get_scheme("w4a8"), lambda *_: None)
    spool = out.with_name(out.name + "-spool")
    spool.mkdir()
    writer = TensorsWriter(ShardWriter(spool), out)
    ctx = PassContext(calibration=calib, progress=False)
    run_passes(
        lazy,
        QuantState(model=skeleton, plan=plan),
        passes,
        ctx,
        RunSettings(writer=writer, work=spool),
    )
    writer.close()
    config = dict(source.config, tie_word_embeddings=skeleton.config.tie_word_embeddings)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _passes(arch: str) -> list[Any]:
    from ptq.passes.rotation import RotationPass
    from ptq.passes.smoothquant import SmoothQuantConfig, SmoothQuantPass

    smooth = SmoothQuantPass(SmoothQuantConfig(alpha=0.5))
    return [smooth] if arch in NO_ROTATION else [RotationPass(), smooth]


@pytest.mark.parametrize("arch", ARCHS)
def test_fp_model_unchanged_by_rotation_and_smoothquant(
    arch: str, models: dict[str, Path], tmp_path: Path
) -> None:
    """Block by block on the lazily read model, and in memory: same logits to fp32."""
    from ptq.pipeline import PassContext, Pipeline, QuantState
    from ptq.plan import build_plan
    from ptq.scheme import get_scheme

    ref = _fp_logits(models[arch])
    calib = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    lazy = _transform_lazily(models[arch], _passes(arch), calib, tmp_path / "t")
    model, _ = load_fp_model(resolve_model(lazy))
    in_memory, _ = load_fp_model(resolve_model(models[arch]))
    plan = build_plan(in_memory, get_scheme("w4a8"))
    ctx = PassContext(calibration=calib, progress=False)
    Pipeline(_passes(arch)).run(QuantState(model=in_memory, plan=plan), ctx)
    for transformed in (model, in_memory):
        with torch.no_grad():
            out = transformed(input_ids=_ids()).logits
        assert float((out - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
        assert float((out - ref).norm() / ref.norm()) < 1e-5
    changed = [n for n, p in model.named_parameters() if p.dim() == 2]
    assert changed  # the weights did change (rotated or smoothed)
