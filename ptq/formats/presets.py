"""Named formats and their exact storage cost.

``preset(name)`` returns a :class:`QuantFormat`; unknown names raise a ``ValueError``
listing the valid ones. ``bits_per_weight(fmt, rows, cols)`` counts every stored bit of
an ``rows x cols`` weight: codes, scales (``SCALE_BITS``), zero points (element bits
each, as compressed-tensors packs them), the fp32 global scale (NVFP4) and fp32
per-row scales (ZeroQuant-FP M2). ``nominal_bits_per_weight`` is that count for a
4096 x 4096 matrix (e.g. INT4 g128 with fp16 scales: 4 + 16/128 = 4.125).

Scale dtypes: INT and FP4-g128 presets use fp16 scales (the GPTQ/compressed-tensors
convention); FP8 tensor/channel/block use fp32 (DeepSeek's block scales are fp32);
MX formats E8M0 with the OCP rule; NVFP4 E4M3 under an fp32 global scale.
"""

from __future__ import annotations

import math
from types import MappingProxyType

from ptq.formats.element import (
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E5M2,
    INT2,
    INT3,
    INT4,
    INT8,
    MXINT8,
)
from ptq.formats.granularity import PerBlock, PerChannel, PerGroup, PerTensor
from ptq.formats.qformat import QuantFormat
from ptq.formats.scales import SCALE_BITS

NOMINAL_SHAPE = (4096, 4096)


def _mx(element: object, name: str) -> QuantFormat:
    return QuantFormat(element, PerGroup(32), scale_format="e8m0", scale_rule="mx", name=name)  # type: ignore[arg-type]


_PRESETS: MappingProxyType[str, QuantFormat] = MappingProxyType(
    {
        "int4_g128": QuantFormat(INT4, PerGroup(128), scale_format="fp16", name="int4_g128"),
        "int4_g64": QuantFormat(INT4, PerGroup(64), scale_format="fp16", name="int4_g64"),
        "int4_g32": QuantFormat(INT4, PerGroup(32), scale_format="fp16", name="int4_g32"),
        "int4_g128_asym": QuantFormat(
            INT4, PerGroup(128), symmetric=False, scale_format="fp16", name="int4_g128_asym"
        ),
        "int4_channel": QuantFormat(INT4, PerChannel(), scale_format="fp16", name="int4_channel"),
        "int3_g64": QuantFormat(INT3, PerGroup(64), scale_format="fp16", name="int3_g64"),
        "int2_g64": QuantFormat(INT2, PerGroup(64), scale_format="fp16", name="int2_g64"),
        "int8_channel": QuantFormat(INT8, PerChannel(), scale_format="fp16", name="int8_channel"),
        "int8_tensor": QuantFormat(INT8, PerTensor(), scale_format="fp32", name="int8_tensor"),
        "fp8_e4m3_channel": QuantFormat(FP8_E4M3, PerChannel(), name="fp8_e4m3_channel"),
        "fp8_e4m3_tensor": QuantFormat(FP8_E4M3, PerTensor(), name="fp8_e4m3_tensor"),
        "fp8_e5m2_channel": QuantFormat(FP8_E5M2, PerChannel(), name="fp8_e5m2_channel"),
        "fp8_block128": QuantFormat(FP8_E4M3, PerBlock(128, 128), name="fp8_block128"),
        "mxfp8": _mx(FP8_E4M3, "mxfp8"),
        "mxfp8_e5m2": _mx(FP8_E5M2, "mxfp8_e5m2"),
        "mxfp6_e2m3": _mx(FP6_E2M3, "mxfp6_e2m3"),
        "mxfp6_e3m2": _mx(FP6_E3M2, "mxfp6_e3m2"),
        "mxfp4": _mx(FP4_E2M1, "mxfp4"),
        "mxint8": _mx(MXINT8, "mxint8"),
        "nvfp4": QuantFormat(
            FP4_E2M1, PerGroup(16), scale_format="e4m3", global_scale=True, name="nvfp4"
        ),
        "nvint4": QuantFormat(
            INT4, PerGroup(16), scale_format="e4m3", global_scale=True, name="nvint4"
        ),
        "fp4_e2m1_g128": QuantFormat(
            FP4_E2M1, PerGroup(128), scale_format="fp16", name="fp4_e2m1_g128"
        ),
        "fp4_e2m1_g32_ue5m3": QuantFormat(
            FP4_E2M1, PerGroup(32), scale_format="ue5m3", name="fp4_e2m1_g32_ue5m3"
        ),
        "fp4_zqfp_m1": QuantFormat(FP4_E2M1, PerChannel(), scale_format="pow2", name="fp4_zqfp_m1"),
        "fp4_zqfp_m2_g128": QuantFormat(
            FP4_E2M1,
            PerGroup(128),
            scale_format="pow2",
            channel_scale=True,
            name="fp4_zqfp_m2_g128",
        ),
    }
)


def preset_names() -> tuple[str, ...]:
    """All preset names, sorted."""
    return tuple(sorted(_PRESETS))


def preset(name: str) -> QuantFormat:
    """The preset format called ``name``.

    Raises:
        ValueError: Unknown name (the message lists the valid names).
    """
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown format preset {name!r}; valid: {', '.join(preset_names())}"
        ) from None


def storage_bits(fmt: QuantFormat, rows: int, cols: int) -> int:
    """Exact bits stored for a ``rows x cols`` weight in ``fmt`` (codes + all scales).

    Raises:
        ValueError: Non-positive shape, or a group size that does not divide ``cols``.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"weight shape must be positive, got {rows}x{cols}")
    r, c = fmt.granularity.block_shape(rows, cols)
    blocks = math.ceil(rows / r) * math.ceil(cols / c)
    total = rows * cols * fmt.element.bits + blocks * SCALE_BITS[fmt.scale_format]
    if not fmt.symmetric:
        total += blocks * fmt.element.bits
    if fmt.global_scale:
        total += 32
    if fmt.channel_scale:
        total += rows * 32
    return total


def bits_per_weight(fmt: QuantFormat, rows: int, cols: int) -> float:
    """:func:`storage_bits` divided by the number of weights."""
    return storage_bits(fmt, rows, cols) / (rows * cols)


def nominal_bits_per_weight(fmt: QuantFormat) -> float:
    """Bits per weight of a large (4096 x 4096) matrix."""
    return bits_per_weight(fmt, *NOMINAL_SHAPE)


def get_preset(name: str) -> QuantFormat:
    """Alias of :func:`preset` (the name the CLI uses)."""
    return preset(name)
