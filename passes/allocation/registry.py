"""Candidate names -> :class:`Candidate`: parse lists like ``"int4_g128,nvfp4,fp16"``.

Base names resolve, in order, through :func:`default_format`:

1. dense names ``fp16``, ``bf16``, ``fp32`` -> ``None`` (keep the weight unquantized);
2. short aliases (``fp8`` -> ``fp8_e4m3_channel``, ``mxfp6`` -> ``mxfp6_e2m3``, ...);
3. the named-format registry :func:`ptq.formats.presets.preset` (``int4_g128``,
   ``nvfp4``, ``mxfp4``, ``fp8_block128``, ...);
4. a format descriptor (:func:`ptq.formats.names.parse_descriptor`: ``int4_g256``,
   ``int3_g128_asym``, ``fp6_e3m2_g32``, ...).

Grammar of one candidate (no spaces inside a name)::

    candidate := base ["+lorc" RANK ["@" base]]

``+lorc16`` adds a rank-16 LoRC correction with dense (16-bit) factors;
``+lorc16@int8_channel`` stores the factors in INT8 per channel. Any other resolver
(``Callable[[str], QuantFormat | None]``) can be passed as ``resolve=``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ptq.formats import QuantFormat
from ptq.formats.names import FormatNameError, parse_descriptor
from ptq.formats.presets import preset, preset_names
from ptq.passes.allocation.candidates import Candidate

FormatResolver = Callable[[str], "QuantFormat | None"]
"""Name -> format; ``None`` for a dense (keep) name; ``ValueError`` for unknown names."""

DENSE_BITS = {"fp16": 16, "bf16": 16, "fp32": 32}
ALIASES = {
    "fp8": "fp8_e4m3_channel",
    "fp8_channel": "fp8_e4m3_channel",
    "fp8_tensor": "fp8_e4m3_tensor",
    "fp8_e5m2": "fp8_e5m2_channel",
    "mxfp6": "mxfp6_e2m3",
}
_LORC = re.compile(r"(?P<base>[^+@]+)\+lorc(?P<rank>\d+)(?:@(?P<factor>[^+@]+))?")


def default_format(name: str) -> QuantFormat | None:
    """Resolve a base name (dense, alias, preset, descriptor; see the module).

    Raises:
        ValueError: unknown name; the message names the part that could not be read.
    """
    if name in DENSE_BITS:
        return None
    target = ALIASES.get(name, name)
    if target in preset_names():
        return preset(target)
    try:
        return parse_descriptor(name)
    except FormatNameError as exc:
        raise ValueError(
            f"unknown candidate format {name!r} (dense: {', '.join(DENSE_BITS)}; aliases: "
            f"{', '.join(ALIASES)}; each optionally +lorc{{R}}[@{{factor}}]): {exc}"
        ) from None


def parse_candidate(spec: str, resolve: FormatResolver = default_format) -> Candidate:
    """Parse one candidate name (see the module grammar) into a :class:`Candidate`.

    Args:
        spec: e.g. ``"int4_g128"``, ``"nvfp4"``, ``"int3_g64+lorc8@int8_channel"``.
        resolve: Base-name lookup (default: dense, aliases, presets, local integers).
    """
    name = spec.strip()
    if not name:
        raise ValueError("empty candidate name")
    m = _LORC.fullmatch(name)
    base = m.group("base") if m else name
    fmt = resolve(base)
    dense_bits = DENSE_BITS.get(base, 16)
    if m is None:
        if "+" in name or "@" in name:
            raise ValueError(f"malformed LoRC candidate {name!r}; expected BASE+lorcR[@FACTOR]")
        return Candidate(name, fmt, dense_bits=dense_bits)
    rank = int(m.group("rank"))
    if rank < 1:
        raise ValueError(f"candidate {name!r}: LoRC rank must be >= 1")
    factor = m.group("factor")
    factor_fmt = resolve(factor) if factor else None
    if fmt is None:
        raise ValueError(f"candidate {name!r}: LoRC needs a quantized base, not {base!r}")
    return Candidate(name, fmt, lorc_rank=rank, lorc_format=factor_fmt)


def parse_candidates(spec: str, resolve: FormatResolver = default_format) -> list[Candidate]:
    """Parse a comma-separated list, e.g. ``"int8_channel,fp8,int4_g128,nvfp4,fp16"``.

    Raises:
        ValueError: an empty list, a duplicate name, or an unknown/malformed name.
    """
    names = [s.strip() for s in spec.split(",")]
    if not spec.strip() or any(not n for n in names):
        raise ValueError(f"candidate list {spec!r} is empty or has an empty entry")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"candidate {n!r} is listed twice in {spec!r}")
        seen.add(n)
    return [parse_candidate(n, resolve) for n in names]
