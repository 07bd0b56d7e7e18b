"""``--stats-tuning`` end to end: gains and biases fitted, exported, verified, reloaded."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ptq.models.quantized_loader import load_quantized_model
from ptq.qlinear import QuantLinear

Run = Callable[..., object]
CAL = ("--calib-samples", "4", "--calib-seqlen", "32", "-q")


def test_stats_tuning_writes_a_loadable_corrected_model(
    run_cli: Run, tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "st"
    r = run_cli("quantize", str(tiny_llama), "--w4a16", "--stats-tuning", "-o", str(out), *CAL)
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    records = json.loads((out / "ptq_records.json").read_text())["bias_correction"]
    assert records and all("gain_mean" in v and "shift_abs_mean" in v for v in records.values())
    assert any(v["gain_min"] != 1.0 for v in records.values())
    r = run_cli("verify", str(out))
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    config = json.loads((out / "config.json").read_text())
    assert config["attention_bias"] and config["mlp_bias"]
    model, _ = load_quantized_model(out)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.bias is not None for m in layers)
    assert any(float(m.bias.abs().max()) > 0 for m in layers if m.bias is not None)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert bool(torch.isfinite(logits).all())


def test_stats_tuning_conflicts_are_usage_errors(
    run_cli: Run, tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o"
    both = ("--bias-correction", "--stats-tuning")
    r = run_cli("quantize", str(tiny_llama), "--w4a16", *both, "-o", str(out), *CAL)
    assert r.exit_code == 2 and "choose --bias-correction or --stats-tuning" in r.output  # type: ignore[attr-defined]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scheme: w4a16\npasses:\n  - rtn\n")
    r = run_cli(
        "quantize", str(tiny_llama), "--recipe", str(recipe), "--stats-tuning", "-o", str(out)
    )
    assert r.exit_code == 2 and "add a bias_correction pass" in r.output  # type: ignore[attr-defined]
    assert not out.exists()
