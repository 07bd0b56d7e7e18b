"""SensitivityTable: JSON round trip (NaN as null), strict loading, re-solve from cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ptq.passes.allocation import SensitivityTable, build_problem, parse_candidates, solve_ilp


def _table() -> SensitivityTable:
    return SensitivityTable.from_mapping(
        {
            "a": {"int4_g128": 0.5, "int8_channel": 0.01, "fp16": 0.0},
            "b": {"int4_g64": 0.25, "int8_channel": 0.02, "fp16": 0.0},
        },
        {"a": (128, 256), "b": (64, 192)},
        metric="nll_delta",
        source="unit-test",
    )


def test_from_mapping_fills_missing_with_nan() -> None:
    t = _table()
    assert t.candidates == ("int4_g128", "int8_channel", "fp16", "int4_g64")
    assert math.isnan(t.value("a", "int4_g64")) and math.isnan(t.value("b", "int4_g128"))
    assert t.value("b", "int4_g64") == 0.25
    assert t.n_weights == 128 * 256 + 64 * 192


def test_json_round_trip_and_resolve(tmp_path: Path) -> None:
    t = _table()
    path = tmp_path / "sens.json"
    t.save(path)
    raw = json.loads(path.read_text())
    assert raw["version"] == 1 and raw["kind"] == "ptq.sensitivity"
    assert raw["layers"][0]["loss"][3] is None
    back = SensitivityTable.load(path)
    assert back.layers == t.layers and back.candidates == t.candidates
    assert back.shapes == t.shapes and back.metric == "nll_delta" and back.source == "unit-test"
    np.testing.assert_array_equal(back.loss, t.loss)  # NaN compare equal here
    cands = parse_candidates("int4_g128,int4_g64,int8_channel,fp16")
    a1 = solve_ilp(build_problem(t, cands), "8.1bits")
    a2 = solve_ilp(build_problem(back, cands), "8.1bits")
    assert a1.choice == a2.choice and a1.objective == a2.objective
    assert json.loads(json.dumps(a1.to_dict()))["choice"] == dict(a1.choice)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update(version=2), "version 2 is not supported"),
        (lambda d: d.update(kind="other"), "not a sensitivity table"),
        (lambda d: d.update(extra=1), r"unknown keys \['extra'\]"),
        (lambda d: d.pop("metric"), r"missing keys \['metric'\]"),
        (lambda d: d["layers"][0].update(bias=1), "unknown keys"),
        (lambda d: d["layers"][0]["loss"].pop(), "one value per candidate"),
        (lambda d: d["layers"][0]["loss"].__setitem__(0, "x"), "finite numbers or null"),
        (lambda d: d["layers"][0].update(shape=[128]), "shape must be two positive ints"),
        (lambda d: d["layers"][1].update(name="a"), "duplicate layer name 'a'"),
        (lambda d: d["candidates"].__setitem__(1, "fp16"), "duplicate candidate"),
    ],
)
def test_strict_loading(tmp_path: Path, mutate: object, match: str) -> None:
    data = _table().to_dict()
    mutate(data)  # type: ignore[operator]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match) as info:
        SensitivityTable.load(path)
    assert "bad.json" in str(info.value)


def test_invalid_tables() -> None:
    with pytest.raises(ValueError, match="infinite loss delta for layer 'a'"):
        SensitivityTable(("a",), ("c",), ((1, 1),), np.array([[np.inf]]))
    with pytest.raises(ValueError, match="expected"):
        SensitivityTable(("a",), ("c",), ((1, 1),), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="no shape given"):
        SensitivityTable.from_mapping({"a": {"c": 1.0}}, {})
    with pytest.raises(ValueError, match="cannot load sensitivity table"):
        SensitivityTable.load("/nonexistent/sens.json")


def test_non_string_names_rejected() -> None:
    data = _table().to_dict()
    data["layers"][0]["name"] = 5
    with pytest.raises(ValueError, match="non-empty strings"):
        SensitivityTable.from_dict(data)
    data = _table().to_dict()
    data["metric"] = 1
    with pytest.raises(ValueError, match="'metric' must be a string"):
        SensitivityTable.from_dict(data)
