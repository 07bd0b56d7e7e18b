"""A table of every element format and preset, for the ``ptq formats`` CLI command.

Each row: name, bits per weight (element bits, or the preset's nominal bits for a
4096 x 4096 matrix including scale overhead), largest finite magnitude of the element
grid, smallest positive step (minimum subnormal; 1 for integers), and a description.
Ranges are those of the element grid, before scaling.
"""

from __future__ import annotations

from typing import NamedTuple

from ptq.formats.element import (
    FP4_E1M2,
    FP4_E2M1,
    FP4_E3M0,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E4M3FNUZ,
    FP8_E5M2,
    FP8_E5M2FNUZ,
    INT2,
    INT3,
    INT4,
    INT5,
    INT6,
    INT7,
    INT8,
    MXINT8,
    UINT4,
    UINT8,
    ElementFormat,
    FloatFormat,
)
from ptq.formats.presets import nominal_bits_per_weight, preset, preset_names
from ptq.formats.qformat import QuantFormat
from ptq.formats.scales import UE5M3


class FormatRow(NamedTuple):
    """One row of :func:`format_table`."""

    name: str
    bits_per_weight: float
    range_max: float
    smallest_step: float
    description: str


ELEMENT_FORMATS: tuple[ElementFormat, ...] = (
    INT2, INT3, INT4, INT5, INT6, INT7, INT8, UINT4, UINT8, MXINT8,
    FP8_E4M3, FP8_E4M3FNUZ, FP8_E5M2, FP8_E5M2FNUZ, FP6_E2M3, FP6_E3M2,
    FP4_E2M1, FP4_E3M0, FP4_E1M2, UE5M3,
)  # fmt: skip


def _describe_element(el: ElementFormat) -> str:
    if isinstance(el, FloatFormat):
        specials = {
            "ieee": "IEEE Inf/NaN",
            "fn": "no Inf, all-ones NaN",
            "fnuz": "no Inf, NaN=0x80, no -0",
            "none": "all finite",
        }[el.inf_nan]
        sign = "" if el.signed else "unsigned "
        return f"{sign}minifloat E{el.exp_bits}M{el.man_bits} bias {el.exp_bias}, {specials}"
    kind = "signed" if el.signed else "unsigned"
    rng = f"[{el.qmin}, {el.qmax}]"
    return f"{kind} {el.bits}-bit integer {rng}" + (" (restricted)" if el.restricted else "")


def _describe_format(fmt: QuantFormat) -> str:
    g = fmt.granularity
    gran = {
        "tensor": "per tensor",
        "channel": "per channel",
        "group": f"per {getattr(g, 'size', '?')}",
        "block": f"per {getattr(g, 'rows', '?')}x{getattr(g, 'cols', '?')} block",
    }[g.name]
    parts = [fmt.element.name, gran, f"{fmt.scale_format} scale"]
    if fmt.scale_rule != "amax":
        parts.append(f"{fmt.scale_rule} rule")
    if not fmt.symmetric:
        parts.append("zero point")
    if fmt.global_scale:
        parts.append("fp32 global scale")
    if fmt.channel_scale:
        parts.append("fp32 per-channel real scale (ZeroQuant-FP M2)")
    return ", ".join(parts)


def format_row(name: str, fmt: QuantFormat) -> FormatRow:
    """The row of one weight format (a preset or a descriptor)."""
    return FormatRow(
        name,
        nominal_bits_per_weight(fmt),
        fmt.element.max_value,
        fmt.element.min_subnormal,
        _describe_format(fmt),
    )


def format_table(names: tuple[str, ...] = ()) -> list[FormatRow]:
    """Rows for every element format, then every preset (sorted by name); with ``names``
    (presets or descriptors, :mod:`ptq.formats.names`) only theirs."""
    from ptq.formats.names import parse_format

    if names:
        return [format_row(n, parse_format(n)) for n in names]
    rows = [
        FormatRow(el.name, float(el.bits), el.max_value, el.min_subnormal, _describe_element(el))
        for el in ELEMENT_FORMATS
    ]
    return rows + [format_row(name, preset(name)) for name in preset_names()]
