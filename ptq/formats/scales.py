"""Scale encodings: how a per-tensor/channel/group/block scale is itself stored.

* ``fp32``/``fp16``/``bf16``: IEEE floats (bf16 per Google Brain's format).
* ``e8m0``: unsigned power of two ``2^(x - 127)``, the OCP MX shared scale.
* ``e4m3``: a positive FP8 E4M3 value (NVFP4's per-16 scale).
* ``ue5m3``: unsigned 5/3 minifloat, bias 15, no Inf, 0xFF = NaN, subnormals on (our
  choice; the format's proposers published no bias, see REFERENCE.md section 2).
* ``pow2``: real power of two held in fp32 (ZeroQuant-FP's FP4 -> FP8 exact-cast scales).
"""

from __future__ import annotations

from typing import Literal

import torch

from ptq.formats.element import FloatFormat
from ptq.formats.minifloat import round_to_float_grid

ScaleFormat = Literal["fp32", "fp16", "bf16", "e8m0", "e4m3", "ue5m3", "pow2"]
SCALE_FORMATS: tuple[ScaleFormat, ...] = ("fp32", "fp16", "bf16", "e8m0", "e4m3", "ue5m3", "pow2")

E4M3_SCALE = FloatFormat(4, 3, 7, "fn", name_override="e4m3")
UE5M3 = FloatFormat(5, 3, 15, "fn", signed=False, name_override="ue5m3")

SCALE_BITS: dict[str, int] = {
    "fp32": 32,
    "fp16": 16,
    "bf16": 16,
    "e8m0": 8,
    "e4m3": 8,
    "ue5m3": 8,
    "pow2": 8,
}


def encode_scale(scale: torch.Tensor, fmt: ScaleFormat, round_up: bool = False) -> torch.Tensor:
    """Round a positive fp32 scale onto ``fmt``'s grid; the result is fp32.

    Args:
        scale: Positive scales.
        fmt: Target scale format.
        round_up: For power-of-two formats, use ``ceil(log2 s)`` (never clips) instead of
            nearest in the log domain... only ``e8m0``/``pow2`` honour it.
    """
    s = scale.float()
    if fmt == "fp32":
        return s
    if fmt == "fp16":
        return s.to(torch.float16).float()
    if fmt == "bf16":
        return s.to(torch.bfloat16).float()
    if fmt in ("e8m0", "pow2"):
        log2 = torch.log2(s)
        e = torch.ceil(log2) if round_up else torch.floor(log2)
        return torch.exp2(torch.clamp(e, -127, 127))
    if fmt == "e4m3":
        return round_to_float_grid(s, E4M3_SCALE).clamp(min=E4M3_SCALE.min_subnormal)
    if fmt == "ue5m3":
        return round_to_float_grid(s, UE5M3).clamp(min=UE5M3.min_subnormal)
    raise ValueError(f"unknown scale format {fmt!r}; valid: {', '.join(SCALE_FORMATS)}")
