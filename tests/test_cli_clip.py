"""``--clip mse`` end to end: quantize, verify, compressed-tensors, smaller weight error."""

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


def _quantized_weights(out: Path) -> dict[str, torch.Tensor]:
    model, _ = load_quantized_model(out)
    return {
        n: m.weight.detach().float() for n, m in model.named_modules() if isinstance(m, QuantLinear)
    }


def _fp_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(model_dir / "model.safetensors"))
    return {k[: -len(".weight")]: v.float() for k, v in tensors.items() if k.endswith(".weight")}


def _quantize(run_cli: Run, model: Path, out: Path, *extra: str) -> None:
    args = ["quantize", str(model), "--w4a16", "-o", str(out), "-q", *extra]
    r = run_cli(*args, "--calib-samples", "4", "--calib-seqlen", "32")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_mse_clip_is_recorded_verified_and_loads(
    run_cli: Run, tiny_llama: Path, tmp_path: Path, method: str
) -> None:
    out = tmp_path / method
    _quantize(run_cli, tiny_llama, out, "--clip", "mse", "--method", method)
    plan = json.loads((out / "ptq_plan.json").read_text())
    assert '"clip": "mse"' in json.dumps(plan)
    r = run_cli("verify", str(out))
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert all(g["format"] == "pack-quantized" for g in qc["config_groups"].values())


def test_mse_clip_lowers_every_layers_weight_error(
    run_cli: Run, tiny_llama: Path, tmp_path: Path
) -> None:
    # RTN: the clipping search minimises each layer's weight error, which is what this checks
    # (GPTQ and AWQ, the calibrated defaults, minimise output error instead).
    _quantize(run_cli, tiny_llama, tmp_path / "amax", "--method", "rtn")
    _quantize(run_cli, tiny_llama, tmp_path / "mse", "--clip", "mse", "--method", "rtn")
    fp = _fp_weights(tiny_llama)
    amax, mse = _quantized_weights(tmp_path / "amax"), _quantized_weights(tmp_path / "mse")
    assert amax.keys() == mse.keys() and amax
    strictly_lower = 0
    for name, w in amax.items():
        err_amax = float((w - fp[name]).pow(2).sum())
        err_mse = float((mse[name] - fp[name]).pow(2).sum())
        assert err_mse <= err_amax * (1 + 1e-6), name  # the search includes ratio 1
        strictly_lower += err_mse < err_amax * 0.999
    assert strictly_lower == len(amax)


def test_clip_that_does_not_fit_is_a_usage_error(
    run_cli: Run, tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    args = ["quantize", str(tiny_llama), "--weight-format", "int4_g128_asym", "--clip", "mse"]
    r = run_cli(*args, "-o", str(out))
    assert r.exit_code == 2, r.output  # type: ignore[attr-defined]
    assert "--clip mse" in r.output and "asymmetric" in r.output  # type: ignore[attr-defined]
    assert "Traceback" not in r.output  # type: ignore[attr-defined]
    assert not out.exists()
    r = run_cli("quantize", str(tiny_llama), "--w4a16", "--clip", "max", "-o", str(out))
    assert r.exit_code == 2 and not out.exists()  # type: ignore[attr-defined]
