"""Kernel-efficiency tables: presets, JSON files, inline specs, glob lookup, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptq.passes.allocation import LatencyModel, parse_candidate
from ptq.passes.allocation.candidates import H200_BANDWIDTH
from ptq.passes.allocation.kernel_efficiency import PRESETS, parse_latency_model


def test_lookup_exact_then_glob_then_default() -> None:
    model = LatencyModel(efficiency={"int4_g64": 0.5, "int4_*": 0.3}, default_efficiency=0.1)
    assert model.eff("int4_g64") == 0.5
    assert model.eff("int4_g128") == 0.3
    assert model.eff("int4_g128+lorc8") == 0.3
    assert model.eff("nvfp4") == 0.1
    cand = parse_candidate("int4_g128")
    assert model.seconds(cand, 4096, 4096) == pytest.approx(8_650_752 / H200_BANDWIDTH / 0.3)


def test_h200_preset_is_the_measured_table() -> None:
    model = parse_latency_model("h200-ptq-fp16")
    # benchmarks/results/gpu_kernels_h200.md: fp16 GEMV rows, mean % of 4.8 TB/s
    assert model.eff("int4_g64") == pytest.approx(0.313)
    assert model.eff("fp8") == pytest.approx(0.407)
    assert model.eff("nvfp4") == model.eff("mxfp4") == pytest.approx(0.205)
    assert model.eff("fp16") == pytest.approx(0.660)
    assert model.eff("int3_g64") == pytest.approx(0.205)  # no kernel timed: slowest measured
    assert parse_latency_model(None) is PRESETS["roofline"]
    assert parse_latency_model("roofline").eff("anything") == 1.0


def test_inline_and_json_specs(tmp_path: Path) -> None:
    inline = parse_latency_model("int4_*=0.31, fp8=0.4,default=0.2,bandwidth=1e12")
    assert inline.bandwidth == 1e12 and inline.default_efficiency == 0.2
    assert inline.eff("int4_g128") == 0.31 and inline.eff("fp8") == 0.4
    path = tmp_path / "eff.json"
    path.write_text(json.dumps({"bandwidth": 2e12, "efficiency": {"nvfp4": 0.25}}))
    model = parse_latency_model(str(path))
    assert model.bandwidth == 2e12 and model.eff("nvfp4") == 0.25 and model.eff("x") == 1.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("h100", "not a preset"),
        ("int4=fast", "not a number"),
        ("int4=0.3,=0.2", "malformed"),
        ("int4=0", "must be positive"),
        ("bandwidth=-1,int4=0.3", "bandwidth must be a positive"),
        ("missing.json", "cannot read"),
    ],
)
def test_bad_specs_are_named(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_latency_model(spec)


def test_bad_json_shapes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"efficency": {}}))
    with pytest.raises(ValueError, match="keys among"):
        parse_latency_model(str(bad))
    bad.write_text(json.dumps({"efficiency": {"int4": True}}))
    with pytest.raises(ValueError, match="must be a number"):
        parse_latency_model(str(bad))
