"""Weight formats by name: a preset, or a descriptor such as ``int5_g64`` or ``fp6_e3m2_g32``.

Grammar (parts joined by ``_``; a preset name wins over the same descriptor)::

    descriptor  := element ["_" granularity] {"_" modifier}
    element     := "int" B                   signed integer, B in 2..8
                 | "fp" N "_e" E "m" M        sign-magnitude minifloat ExMy, N = 1 + E + M <= 8
    granularity := "g" G                     one scale per G inputs (G >= 1)
                 | "channel"                 one scale per output row (the default)
                 | "tensor"                  one scale for the tensor
                 | "b" R "x" C               one scale per R x C tile
    modifier    := "asym"                    integers only: a zero point per scale block
                 | "fp16" | "bf16" | "fp32" | "e8m0" | "e4m3" | "ue5m3" | "pow2"
                                             how scales are stored (default fp16)
                 | "global"                  an fp32 per-tensor second level (as NVFP4)

Minifloats take the standard bias ``2^(E-1) - 1``; FP8 E4M3 is the OCP ``fn`` format
(no Inf, one NaN), FP8 E5M2 IEEE-style, every other ExMy all-finite (REFERENCE.md
section 1). Power-of-two scale encodings (``e8m0``, ``pow2``) round scales up so that
nothing clips. Examples: ``int5_g64``, ``int4_g32_asym``, ``fp6_e3m2_g32``,
``fp4_e2m1_g16_ue5m3``, ``fp4_e2m1_g16_e4m3_global`` (NVFP4's layout), ``int8_b128x128``.
"""

from __future__ import annotations

import re

from ptq.formats.element import (
    FP4_E1M2,
    FP4_E2M1,
    FP4_E3M0,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    ElementFormat,
    FloatFormat,
    IntFormat,
)
from ptq.formats.granularity import Granularity, PerBlock, PerChannel, PerGroup, PerTensor
from ptq.formats.presets import preset, preset_names
from ptq.formats.qformat import QuantFormat
from ptq.formats.scales import SCALE_FORMATS, ScaleFormat

GRAMMAR = (
    "element[_granularity][_modifier...]: element int{2..8} or fp{N}_e{E}m{M}; "
    "granularity g{G}, channel, tensor or b{R}x{C}; modifiers asym, global, and a scale "
    f"format ({', '.join(SCALE_FORMATS)}; default fp16)"
)
_INT = re.compile(r"int(\d+)")
_FP = re.compile(r"fp(\d+)")
_EXMY = re.compile(r"e(\d+)m(\d+)")
_GROUP = re.compile(r"g(\d+)")
_BLOCK = re.compile(r"b(\d+)x(\d+)")
_KNOWN_FLOATS = {
    (f.exp_bits, f.man_bits): f
    for f in (FP8_E4M3, FP8_E5M2, FP6_E2M3, FP6_E3M2, FP4_E2M1, FP4_E3M0, FP4_E1M2)
}


class FormatNameError(ValueError):
    """A format name that is neither a preset nor a readable descriptor."""


def _fail(name: str, part: str, why: str) -> FormatNameError:
    return FormatNameError(
        f"format {name!r}: cannot read {part!r}: {why} (a format is a preset or a "
        "descriptor such as int5_g64, int4_g32_asym or fp6_e3m2_g32; grammar: "
        "`ptq formats --help`)"
    )


def _element(name: str, parts: list[str]) -> tuple[ElementFormat, int]:
    """The element from the leading part(s), and how many parts it used."""
    head = parts[0]
    if m := _INT.fullmatch(head):
        bits = int(m.group(1))
        if not 2 <= bits <= 8:
            raise _fail(name, head, "integer elements have 2 to 8 bits")
        return IntFormat(bits), 1
    if m := _FP.fullmatch(head):
        bits = int(m.group(1))
        if len(parts) < 2 or not (e := _EXMY.fullmatch(parts[1])):
            nxt = parts[1] if len(parts) > 1 else ""
            raise _fail(name, f"{head}_{nxt}".rstrip("_"), "a minifloat is fp{N}_e{E}m{M}")
        exp, man = int(e.group(1)), int(e.group(2))
        part = f"{head}_{parts[1]}"
        if exp < 1 or 1 + exp + man != bits:
            raise _fail(name, part, f"1 sign + {exp} exponent + {man} mantissa bits != {bits}")
        if (exp, man) in _KNOWN_FLOATS:
            return _KNOWN_FLOATS[(exp, man)], 2
        try:
            bias = 2 ** (exp - 1) - 1
            return FloatFormat(exp, man, bias, "none", name_override=f"fp{bits}_e{exp}m{man}"), 2
        except ValueError as exc:
            raise _fail(name, part, str(exc)) from None
    raise _fail(name, head, "expected an element: int{B} or fp{N}_e{E}m{M}")


def _granularity(name: str, part: str) -> Granularity | None:
    """The granularity ``part`` names, or None when it is not a granularity."""
    if part == "channel":
        return PerChannel()
    if part == "tensor":
        return PerTensor()
    if m := _GROUP.fullmatch(part):
        if int(m.group(1)) < 1:
            raise _fail(name, part, "a group size is a positive integer")
        return PerGroup(int(m.group(1)))
    if m := _BLOCK.fullmatch(part):
        rows, cols = int(m.group(1)), int(m.group(2))
        if rows < 1 or cols < 1:
            raise _fail(name, part, "block sides are positive integers")
        return PerBlock(rows, cols)
    return None


def parse_descriptor(name: str) -> QuantFormat:
    """The :class:`QuantFormat` a descriptor names (module grammar); no preset lookup.

    Raises:
        FormatNameError: naming the part that could not be read and why.
    """
    parts = name.strip().lower().split("_")
    if not name.strip() or any(not p for p in parts):
        raise _fail(name, name, "empty part")
    element, used = _element(name, parts)
    granularity: Granularity = PerChannel()
    rest = parts[used:]
    if rest and (g := _granularity(name, rest[0])) is not None:
        granularity, rest = g, rest[1:]
    symmetric, global_scale = True, False
    scale: ScaleFormat = "fp16"
    seen: set[str] = set()
    for part in rest:
        if part in seen:
            raise _fail(name, part, "given twice")
        seen.add(part)
        if part == "asym":
            symmetric = False
        elif part == "global":
            global_scale = True
        elif part in SCALE_FORMATS:
            if seen & set(SCALE_FORMATS) - {part}:
                raise _fail(name, part, "a second scale format")
            scale = part
        elif _granularity(name, part) is not None:
            raise _fail(name, part, "the granularity comes right after the element")
        else:
            raise _fail(name, part, f"expected asym, global or a scale format {SCALE_FORMATS}")
    try:
        return QuantFormat(
            element,
            granularity,
            symmetric=symmetric,
            scale_format=scale,
            global_scale=global_scale,
            name=name.strip().lower(),
        )
    except ValueError as exc:
        raise _fail(name, name, str(exc)) from None


def parse_format(name: str) -> QuantFormat:
    """A preset by name, else the format a descriptor describes.

    Raises:
        FormatNameError: neither (the message names the unreadable part).
    """
    key = name.strip()
    if key in preset_names():
        return preset(key)
    return parse_descriptor(key)
