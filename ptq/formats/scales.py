"""Scale encodings: how a per-tensor/channel/group/block scale is itself stored.

* ``fp32``/``fp16``/``bf16``: IEEE floats (bf16 per Google Brain's format).
* ``e8m0``: unsigned power of two ``2^(x - 127)``, ``x`` in 0..254, 0xFF = NaN, no zero:
  the OCP MX v1.0 shared scale.
* ``e4m3``: a positive FP8 E4M3 value (NVFP4's per-16 scale), stored as its fp8 byte.
* ``ue5m3``: unsigned 5/3 minifloat, bias 15, no Inf, 0xFF = NaN, subnormals on. This is
  our choice: "Elucidating the Design Space of FP4 training" proposes UE5M3 but publishes
  no bias or specials (docs/formats.md section 2). Range ``2^-17 .. 114688``.
* ``pow2``: a real power of two held in fp32 and stored as an E8M0 byte (ZeroQuant-FP's
  scales that make FP4 -> FP8 casts exact; Wu et al. 2023).
"""

from __future__ import annotations

from typing import Literal

import torch

from ptq.formats.element import FloatFormat
from ptq.formats.minifloat import decode_float, encode_float, round_finite

ScaleFormat = Literal["fp32", "fp16", "bf16", "e8m0", "e4m3", "ue5m3", "pow2"]
SCALE_FORMATS: tuple[ScaleFormat, ...] = ("fp32", "fp16", "bf16", "e8m0", "e4m3", "ue5m3", "pow2")

E4M3_SCALE = FloatFormat(4, 3, 7, "fn", name_override="e4m3")
UE5M3 = FloatFormat(5, 3, 15, "fn", signed=False, name_override="ue5m3")
E8M0_BIAS = 127

SCALE_BITS: dict[str, int] = {
    "fp32": 32,
    "fp16": 16,
    "bf16": 16,
    "e8m0": 8,
    "e4m3": 8,
    "ue5m3": 8,
    "pow2": 8,
}

SCALE_MAX: dict[str, float] = {
    "fp32": float(torch.finfo(torch.float32).max),
    "fp16": 65504.0,
    "bf16": float(torch.finfo(torch.bfloat16).max),
    "e8m0": 2.0**127,
    "e4m3": E4M3_SCALE.max_value,
    "ue5m3": UE5M3.max_value,
    "pow2": 2.0**127,
}


def _check_format(fmt: str) -> None:
    if fmt not in SCALE_FORMATS:
        raise ValueError(f"unknown scale format {fmt!r}; valid: {', '.join(SCALE_FORMATS)}")


def pow2_exponent(s: torch.Tensor, round_up: bool) -> torch.Tensor:
    """Exact ``floor(log2 s)`` (or ``ceil`` with ``round_up``) of positive fp32 ``s``.

    Uses ``frexp`` (``s = m * 2^e``, ``m`` in [0.5, 1)) rather than ``log2``, which rounds
    values just above a power of two onto it.
    """
    m, e = torch.frexp(s.float())
    floor = e - 1
    if not round_up:
        return floor
    return torch.where(m == 0.5, floor, e)


def encode_scale(scale: torch.Tensor, fmt: ScaleFormat, round_up: bool = False) -> torch.Tensor:
    """Round positive fp32 scales onto ``fmt``'s grid; the result is fp32.

    Args:
        scale: Positive finite scales.
        fmt: Target scale format.
        round_up: Power-of-two formats: ``2^ceil(log2 s)`` (never clips an element)
            instead of ``2^floor(log2 s)``. Other formats round to nearest-even, clamped
            to their smallest positive value (a scale is never zero).
    """
    _check_format(fmt)
    s = scale.float()
    if fmt == "fp32":
        return s
    if fmt == "fp16":
        return s.clamp(max=65504.0).to(torch.float16).float().clamp(min=2.0**-24)
    if fmt == "bf16":
        return s.to(torch.bfloat16).float()
    if fmt in ("e8m0", "pow2"):
        e = torch.clamp(pow2_exponent(s, round_up), -E8M0_BIAS, E8M0_BIAS)
        return torch.ldexp(torch.ones_like(s), e)
    grid = E4M3_SCALE if fmt == "e4m3" else UE5M3
    return round_finite(s, grid).clamp(min=grid.min_subnormal)


def e8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """Powers of two ``2^k`` (``k`` in -127..127) to E8M0 bytes ``k + 127`` (uint8)."""
    m, e = torch.frexp(scale.float())
    if not bool(((m == 0.5) & (e - 1 >= -E8M0_BIAS) & (e - 1 <= E8M0_BIAS)).all()):
        raise ValueError("E8M0 scales must be powers of two in [2^-127, 2^127]")
    return (e - 1 + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes to fp32 ``2^(x - 127)``; 0xFF decodes to NaN."""
    x = codes.to(torch.int32)
    value = torch.ldexp(torch.ones(x.shape, device=x.device), x - E8M0_BIAS)
    return torch.where(x == 255, torch.full_like(value, float("nan")), value)


def scale_to_bytes(scale: torch.Tensor, fmt: ScaleFormat) -> torch.Tensor:
    """Stored 8-bit scales (fp32 values on the grid) to their uint8 codes."""
    _check_format(fmt)
    if fmt in ("e8m0", "pow2"):
        return e8m0_encode(scale)
    if fmt == "e4m3":
        return encode_float(scale, E4M3_SCALE)
    if fmt == "ue5m3":
        return encode_float(scale, UE5M3)
    raise ValueError(f"scale format {fmt!r} is not an 8-bit code; store it as a float tensor")


def scale_from_bytes(codes: torch.Tensor, fmt: ScaleFormat) -> torch.Tensor:
    """Inverse of :func:`scale_to_bytes`: uint8 codes to fp32 scale values."""
    _check_format(fmt)
    if fmt in ("e8m0", "pow2"):
        return e8m0_decode(codes)
    if fmt == "e4m3":
        return decode_float(codes, E4M3_SCALE)
    if fmt == "ue5m3":
        return decode_float(codes, UE5M3)
    raise ValueError(f"scale format {fmt!r} is not an 8-bit code; store it as a float tensor")


def scale_storage_dtype(fmt: ScaleFormat) -> torch.dtype:
    """The torch dtype a scale of ``fmt`` is stored in (uint8 for 8-bit codes)."""
    _check_format(fmt)
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        fmt, torch.uint8
    )
