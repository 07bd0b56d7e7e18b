"""The examples run as documented (on the tiny model)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_custom_pass_example(tiny_llama: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "custom_pass", ROOT / "examples" / "custom_pass.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["custom_pass"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    out = tmp_path / "o"
    mod.main(str(tiny_llama), str(out))
    records = json.loads((out / "ptq_records.json").read_text())
    assert all(r["method"] == "gptq" for r in records["layers"].values())
    assert len(records["layers"]) == 14
    # the pass as the example builds it, at k = 2 so that it clips: its count over every
    # block (it runs block by block) equals a recount on the FP weights
    from ptq.api import CalibrationConfig, quantize
    from ptq.passes.gptq import GPTQPass

    out2 = tmp_path / "k2"
    quantize(
        tiny_llama,
        "w4a16",
        output=out2,
        pipeline=[mod.WeightClipPass(mod.WeightClipConfig(k=2.0)), GPTQPass()],
        calibration=CalibrationConfig(samples=4, seqlen=32),
        progress=False,
        log=lambda *_: None,
    )
    records = json.loads((out2 / "ptq_records.json").read_text())
    # the count over every block (the pass runs block by block), recomputed from FP weights
    from ptq.models.source import load_fp_model, resolve_model

    fp, _ = load_fp_model(resolve_model(str(tiny_llama)))
    expected = 0
    for name in records["layers"]:
        w = fp.get_submodule(name).weight
        mean, std = w.mean(dim=1, keepdim=True), w.std(dim=1, keepdim=True)
        expected += int(((w < mean - 2.0 * std) | (w > mean + 2.0 * std)).sum())
    assert records["weight_clip"]["clipped_values"] == expected > 0


def test_awq_gptq_recipe(run_cli: object, tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "awq"
    r = run_cli(  # type: ignore[operator]
        "quantize", str(tiny_llama), "--recipe", str(ROOT / "examples" / "w4a16_awq_gptq.yaml"),
        "--calib-samples", "4", "--calib-seqlen", "32", "-o", str(out), "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    plan = json.loads((out / "ptq_plan.json").read_text())
    assert {lp["method"] for lp in plan["layers"].values()} == {"awq+gptq"}
