"""``--weight-format`` descriptors end to end, and ``ptq formats NAME``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ptq.models.quantized_loader import load_quantized_model
from ptq.qlinear import QuantLinear

Run = Callable[..., object]


def test_bad_descriptor_is_one_error_line_naming_the_part(run_cli: Run, tiny_llama: Path) -> None:
    r = run_cli("plan", str(tiny_llama), "--weight-format", "int4_g32_fp17")
    assert r.exit_code == 2  # type: ignore[attr-defined]
    lines = r.output.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error: format 'int4_g32_fp17'")
    assert "cannot read 'fp17'" in lines[0]


def test_formats_describes_a_descriptor(run_cli: Run) -> None:
    r = run_cli("formats", "int5_g64", "fp6_e3m2_g32")
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    rows = r.output.splitlines()[1:]  # type: ignore[attr-defined]
    assert rows[0].split()[:2] == ["int5_g64", "5.25"]  # 5 + 16/64
    assert rows[1].split()[:2] == ["fp6_e3m2_g32", "6.5"]  # 6 + 16/32
    bad = run_cli("formats", "fp6_e3m3")
    assert bad.exit_code == 2 and "cannot read 'fp6_e3m3'" in bad.output  # type: ignore[attr-defined]
    assert "fp{N}_e{E}m{M}" in run_cli("formats", "--help").output  # type: ignore[attr-defined]


def test_int5_descriptor_quantizes_to_the_ptq_layout(
    run_cli: Run, tiny_llama: Path, tmp_path: Path
) -> None:
    out = tmp_path / "int5"
    r = run_cli(
        "quantize", str(tiny_llama), "--weight-format", "int5_g32", "--method", "rtn",
        "--target", "ptq", "-o", str(out), "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    plan = json.loads((out / "ptq_plan.json").read_text())
    weights = [lp["weight"] for lp in plan["layers"].values()]
    assert weights and all(w["element"]["bits"] == 5 for w in weights)
    assert all(w["granularity"] == {"kind": "group", "size": 32} for w in weights)
    model, _ = load_quantized_model(out)
    codes = [m.qweight.codes for m in model.modules() if isinstance(m, QuantLinear)]
    assert codes and all(int(c.min()) >= -16 and int(c.max()) <= 15 for c in codes)
    assert any(int(c.abs().max()) > 7 for c in codes)  # more than INT4's range in use
