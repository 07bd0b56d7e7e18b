"""Format names: presets and descriptors (``int5_g64``, ``fp6_e3m2_g32``...)."""

from __future__ import annotations

import pytest

from ptq.formats import (
    FP4_E2M1,
    FP6_E3M2,
    FP8_E4M3,
    INT5,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    preset,
    preset_names,
)
from ptq.formats.names import FormatNameError, parse_descriptor, parse_format


@pytest.mark.parametrize(
    ("name", "element", "granularity", "scale", "symmetric", "two_level"),
    [
        ("int5_g64", INT5, PerGroup(64), "fp16", True, False),
        ("int4_g32_asym", None, PerGroup(32), "fp16", False, False),
        ("fp6_e3m2_g32", FP6_E3M2, PerGroup(32), "fp16", True, False),
        ("fp4_e2m1_g16_ue5m3", FP4_E2M1, PerGroup(16), "ue5m3", True, False),
        ("fp4_e2m1_g16_e4m3_global", FP4_E2M1, PerGroup(16), "e4m3", True, True),
        ("fp8_e4m3_tensor_fp32", FP8_E4M3, PerTensor(), "fp32", True, False),
        ("int7", None, PerChannel(), "fp16", True, False),
        ("int8_b128x64_bf16", None, PerBlock(128, 64), "bf16", True, False),
    ],
)
def test_descriptors(
    name: str,
    element: object,
    granularity: object,
    scale: str,
    symmetric: bool,
    two_level: bool,
) -> None:
    fmt = parse_format(name)
    if element is not None:
        assert fmt.element == element
    assert fmt.granularity == granularity
    assert fmt.scale_format == scale
    assert fmt.symmetric is symmetric
    assert fmt.global_scale is two_level
    assert fmt.name == name


def test_minifloat_of_any_split_has_the_standard_bias() -> None:
    fmt = parse_format("fp5_e2m2_g32")
    assert (fmt.element.exp_bits, fmt.element.man_bits, fmt.element.exp_bias) == (2, 2, 1)
    assert fmt.element.max_value == 7.0  # 2^(3-1) * 1.75, all codes finite


def test_presets_win_and_agree_with_descriptors() -> None:
    for name in preset_names():
        assert parse_format(name) == preset(name)
    # The integer presets are exactly what their names describe.
    assert parse_descriptor("int4_g64") == preset("int4_g64")
    assert parse_descriptor("int8_channel") == preset("int8_channel")


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("int9_g64", "'int9'"),
        ("fp6_e3m3_g32", "'fp6_e3m3'"),
        ("fp6_g32", "'fp6_g32'"),
        ("int4_g64_foo", "'foo'"),
        ("int4_asym_g64", "'g64'"),
        ("int4_g0", "'g0'"),
        ("fp4_e2m1_asym", "'fp4_e2m1_asym'"),
        ("int4_fp16_bf16", "'bf16'"),
        ("int4_asym_asym", "'asym'"),
        ("bogus", "'bogus'"),
        ("int4__g64", "'int4__g64'"),
    ],
)
def test_bad_descriptors_name_the_part(name: str, part: str) -> None:
    with pytest.raises(FormatNameError, match=f"cannot read {part}"):
        parse_format(name)
