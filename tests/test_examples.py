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
    assert records["weight_clip"]["clipped_values"] >= 0
    assert all(r["method"] == "gptq" for r in records["layers"].values())
    assert len(records["layers"]) == 14
