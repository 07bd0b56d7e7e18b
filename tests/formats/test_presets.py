"""Preset registry and exact storage cost."""

from __future__ import annotations

import pytest

from ptq.formats import bits_per_weight, nominal_bits_per_weight, preset, preset_names
from ptq.formats.presets import storage_bits
from ptq.formats.table import format_table

REQUIRED = [
    "int4_g128", "int4_g64", "int4_g128_asym", "int4_channel", "int3_g64", "int2_g64",
    "int8_channel", "fp8_e4m3_channel", "fp8_e4m3_tensor", "fp8_block128", "mxfp8",
    "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp4", "mxint8", "nvfp4", "fp4_e2m1_g128",
]  # fmt: skip


def test_required_presets_exist() -> None:
    assert set(REQUIRED) <= set(preset_names())
    for name in preset_names():
        assert preset(name).name == name


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown format preset 'int5_g7'.*int4_g128.*nvfp4"):
        preset("int5_g7")


@pytest.mark.parametrize(
    ("name", "nominal"),
    [
        ("int4_g128", 4 + 16 / 128),
        ("int4_g128_asym", 4 + (16 + 4) / 128),
        ("int3_g64", 3 + 16 / 64),
        ("mxfp4", 4 + 8 / 32),
        ("mxfp8", 8 + 8 / 32),
        ("mxfp6_e2m3", 6 + 8 / 32),
        ("nvfp4", 4 + 8 / 16 + 32 / 4096**2),
        ("fp8_block128", 8 + 32 / 128**2),
        ("fp8_e4m3_channel", 8 + 32 / 4096),
        ("fp4_zqfp_m2_g128", 4 + 8 / 128 + 32 / 4096),
    ],
)
def test_nominal_bits(name: str, nominal: float) -> None:
    assert nominal_bits_per_weight(preset(name)) == pytest.approx(nominal, abs=1e-12)


def test_exact_bits_small_and_partial() -> None:
    # 200 x 300 at 128x128 blocks: 2 x 3 fp32 scales.
    assert storage_bits(preset("fp8_block128"), 200, 300) == 200 * 300 * 8 + 6 * 32
    # nvfp4 16 x 32: 32 e4m3 scales + one fp32 global.
    assert storage_bits(preset("nvfp4"), 16, 32) == 16 * 32 * 4 + 32 * 8 + 32
    assert bits_per_weight(preset("int4_channel"), 10, 100) == 4 + 16 / 100
    with pytest.raises(ValueError, match="does not divide"):
        bits_per_weight(preset("int4_g128"), 576, 576)


def test_format_table_rows() -> None:
    rows = format_table()
    names = [r.name for r in rows]
    assert {"fp8_e4m3", "fp6_e2m3", "fp4_e2m1", "int4", "ue5m3"} <= set(names)
    assert set(preset_names()) <= set(names)
    by = {r.name: r for r in rows}
    assert (by["fp8_e4m3"].range_max, by["fp8_e4m3"].smallest_step) == (448.0, 2.0**-9)
    assert (by["fp6_e3m2"].range_max, by["fp6_e3m2"].smallest_step) == (28.0, 0.0625)
    assert by["int4_g128"].bits_per_weight == 4.125 and "per 128" in by["int4_g128"].description
    assert all(r.description for r in rows)
