"""The complete tensor format (:class:`QuantFormat`) and a quantized tensor (:class:`QTensor`).

A :class:`QuantFormat` is data: element grid, granularity, scale encoding and rule,
optional second level, clipping and non-finite policy. The maths that uses it lives in
:mod:`ptq.formats.quantizer` and :mod:`ptq.formats.scale_rules`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from ptq.formats.element import ElementFormat, FloatFormat, IntFormat
from ptq.formats.granularity import Granularity, PerChannel, PerGroup
from ptq.formats.rounding import NONFINITE_POLICIES, NonFinitePolicy
from ptq.formats.scales import SCALE_FORMATS, ScaleFormat

ScaleRule = Literal["amax", "mx", "mx_round_up", "full_range", "span"]
ClipSearch = Literal["none", "mse"]
SCALE_RULES: tuple[ScaleRule, ...] = ("amax", "mx", "mx_round_up", "full_range", "span")
FULL_RANGE_SCALES = ("fp32", "fp16", "bf16")
CLIP_SEARCHES: tuple[ClipSearch, ...] = ("none", "mse")


@dataclass(frozen=True)
class QuantFormat:
    """A complete tensor quantization format: element grid, granularity and scales.

    Args:
        element: The element format (integer or minifloat).
        granularity: Which elements share a scale.
        symmetric: Integer formats only: no zero point if True.
        scale_format: How scales are stored (rounded onto that grid).
        scale_rule: ``amax`` (``s = amax / q_max``; rounded up for power-of-two scale
            formats so nothing clips) or the OCP MX shared-exponent rule
            ``2^(floor(log2 amax) - emax_elem)`` (``mx``; ``mx_round_up`` takes the
            smallest power of two with ``amax <= q_max * s`` so no element clips), or
            ``full_range`` (signed integers: ``s = v* / -2^(b-1)`` with ``v*`` the block's
            element of largest magnitude, signed, so ``v*`` lands exactly on code
            ``-2^(b-1)`` and all ``2^b`` codes are used; ``s`` may be negative; ONNX
            Runtime's symmetric RTN rule), or ``span`` (signed integers:
            ``s = amax / ((q_max - q_min) / 2)``, e.g. ``amax / 7.5`` for INT4, so ``-amax``
            lands on code ``-2^(b-1)`` and ``+amax`` saturates to ``2^(b-1) - 1``;
            compressed-tensors' symmetric rule).
        global_scale: Add an fp32 per-tensor second level (NVFP4):
            ``x^ = q * (t_B / g)``.
        clip: ``mse`` searches the clip ratio per block minimising squared error.
        name: Display name for presets.
        nonfinite: ``raise`` on NaN/Inf input, or ``propagate`` them as NaN/Inf codes.
        channel_scale: ZeroQuant-FP "M2": a real fp32 per-row scale ``c_r`` over
            power-of-two per-group factors, ``x^ = q * (2^k_rg * c_r)``; needs
            :class:`PerGroup` and ``scale_format="pow2"``.
    """

    element: ElementFormat
    granularity: Granularity = field(default_factory=PerChannel)
    symmetric: bool = True
    scale_format: ScaleFormat = "fp32"
    scale_rule: ScaleRule = "amax"
    global_scale: bool = False
    clip: ClipSearch = "none"
    name: str = ""
    nonfinite: NonFinitePolicy = "raise"
    channel_scale: bool = False

    def __post_init__(self) -> None:
        if self.scale_format not in SCALE_FORMATS:
            raise ValueError(
                f"unknown scale format {self.scale_format!r}; valid: {', '.join(SCALE_FORMATS)}"
            )
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"unknown scale rule {self.scale_rule!r}; valid: {SCALE_RULES}")
        if self.clip not in CLIP_SEARCHES:
            raise ValueError(f"unknown clip search {self.clip!r}; valid: {CLIP_SEARCHES}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"unknown nonfinite policy {self.nonfinite!r}; valid: {NONFINITE_POLICIES}"
            )
        if not self.symmetric and not isinstance(self.element, IntFormat):
            raise ValueError("asymmetric (zero-point) quantization needs an integer element")
        if not self.symmetric and (self.global_scale or self.channel_scale or self.clip != "none"):
            raise ValueError("asymmetric quantization supports neither second levels nor clip")
        if self.scale_rule in ("full_range", "span"):
            self._check_full_range()
        elif self.scale_rule != "amax" and self.scale_format not in ("e8m0", "pow2"):
            raise ValueError(f"scale rule {self.scale_rule!r} needs an e8m0 or pow2 scale")
        if self.channel_scale and (
            not isinstance(self.granularity, PerGroup) or self.scale_format != "pow2"
        ):
            raise ValueError("channel_scale (ZeroQuant-FP M2) needs PerGroup and pow2 scales")
        if self.channel_scale and self.global_scale:
            raise ValueError("choose one second level: global_scale or channel_scale")
        if self.nonfinite == "propagate" and not (
            isinstance(self.element, FloatFormat) and self.element.has_nan
        ):
            raise ValueError(
                f"nonfinite='propagate' needs an element with a NaN code; {self.element.name} "
                "has none (use nonfinite='raise')"
            )

    def _check_full_range(self) -> None:
        """``full_range`` and ``span`` use the code ``-2^(b-1)``: signed unrestricted
        integers, symmetric, one level, plain float scales."""
        el, rule = self.element, self.scale_rule
        if not (isinstance(el, IntFormat) and el.signed and not el.restricted):
            raise ValueError(
                f"scale rule {rule!r} needs a signed, unrestricted integer element "
                f"(it maps onto code -2^(b-1)), not {el.name}"
            )
        if not self.symmetric or self.global_scale or self.channel_scale:
            raise ValueError(
                f"scale rule {rule!r} is a symmetric single-level rule (no zero point, "
                "global_scale or channel_scale)"
            )
        if self.scale_format not in FULL_RANGE_SCALES:
            raise ValueError(
                f"scale rule {rule!r} needs a plain float scale (full_range stores signed "
                f"scales): use one of {', '.join(FULL_RANGE_SCALES)}, not {self.scale_format!r}"
            )

    def with_granularity(self, granularity: Granularity) -> QuantFormat:
        return replace(self, granularity=granularity)

    @property
    def bits(self) -> int:
        return self.element.bits


@dataclass
class QTensor:
    """A quantized 2-D tensor: integer/bit codes plus the scales needed to decode them.

    ``codes`` is int8 (integer elements, zero point included) or uint8 bit patterns
    (minifloat elements), shaped like the original tensor. ``scale`` holds fp32 values
    of the stored scales (already on the scale format's grid), shape
    ``[ceil(R / r), ceil(C / c)]``. ``global_scale`` ([1], fp32) is NVFP4's second level
    (``x^ = values * (scale / global_scale)``); ``channel_scale`` ([R, 1], fp32) is
    ZeroQuant-FP M2's (``x^ = values * (scale * channel_scale)``).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    fmt: QuantFormat
    zero_point: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    channel_scale: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def effective_scale(self) -> torch.Tensor:
        """Per-block multiplier of the element values, in the op order of dequantization."""
        if self.global_scale is not None:
            return self.scale / self.global_scale
        if self.channel_scale is not None:
            return self.scale * self.channel_scale
        return self.scale
