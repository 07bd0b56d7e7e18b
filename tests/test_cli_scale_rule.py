"""``--scale-rule full-range`` end to end: quantize (RTN, GPTQ), verify, compressed-tensors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ptq.models.quantized_loader import load_quantized_model
from ptq.qlinear import QuantLinear

Run = Callable[..., object]


def _decompress(group: dict, local: dict[str, torch.Tensor]) -> torch.Tensor:  # type: ignore[type-arg]
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    out = BaseCompressor.get_value_from_registry(group["format"]).decompress(local, scheme)
    return out["weight"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_full_range_quantize_verify_and_decompress(
    run_cli: Run, tiny_llama: Path, tmp_path: Path, method: str
) -> None:
    out = tmp_path / method
    args = ["quantize", str(tiny_llama), "--w4a16", "--scale-rule", "full-range", "-o", str(out)]
    args += ["--method", method, "--calib-samples", "6", "--calib-seqlen", "32", "-q"]
    r = run_cli(*args)
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    plan = json.loads((out / "ptq_plan.json").read_text())
    assert "full_range" in json.dumps(plan)
    r = run_cli("verify", str(out))
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(out / "model.safetensors"))
    model, _ = load_quantized_model(out)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    negative = 0
    for group in qc["config_groups"].values():
        assert group["format"] == "pack-quantized" and group["weights"]["symmetric"]
        for name in group["targets"]:
            local = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
            negative += int((local["weight_scale"] < 0).sum())
            assert torch.equal(_decompress(group, local), layers[name].weight.detach()), name
            codes = layers[name].qweight.codes
            assert int(codes.min()) == -8
    assert negative > 0


def test_scale_rule_that_does_not_fit_is_a_usage_error(
    run_cli: Run, tiny_llama: Path, tmp_path: Path
) -> None:
    r = run_cli(
        "quantize",
        str(tiny_llama),
        "--fp8",
        "--scale-rule",
        "full-range",
        "-o",
        str(tmp_path / "o"),
    )
    assert r.exit_code == 2, r.output  # type: ignore[attr-defined]
    assert "--scale-rule full-range" in r.output and "Traceback" not in r.output  # type: ignore[attr-defined]
    assert not (tmp_path / "o").exists()
    r = run_cli("plan", str(tiny_llama), "--w8a8", "--scale-rule", "full-range")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
