"""Quantize with *given* scales, the primitive every rounding optimiser needs.

:func:`ptq.formats.quantize` chooses scales and rounds in one go. GPTQ, AdaRound and
AdaQuant instead fix (or learn) the scales and then decide the rounding themselves, so
this module splits the two steps while keeping ``ptq.formats``' layout and maths:

* :func:`block_scales` asks :func:`ptq.formats.quantize` for the per-block scales of a
  weight (any granularity, scale rule, scale format, second level).
* :func:`round_with_scale` maps ``x`` onto the element grid for a given scale ``s`` and
  zero point ``z``: ``q = clamp(rne(x / s) + z, q_min, q_max)`` for integers and
  ``q = round_to_float_grid(x / s)`` for minifloats (saturating, ties to even).
* :func:`dequantize_with_scale` is ``x^ = (q - z) * s``, the same floating-point
  operations as :func:`ptq.formats.dequantize`, so a :class:`QTensor` built by
  :func:`build_qtensor` dequantizes to the optimiser's result bit for bit.

Scales are kept as *stored* values (what ``QTensor.scale`` holds, e.g. the E4M3 number
of NVFP4) plus an optional per-tensor ``global_scale``; the effective scale is
``stored / global_scale``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ptq.formats import (
    FloatFormat,
    IntFormat,
    PerBlock,
    PerTensor,
    QTensor,
    QuantFormat,
    quantize,
)
from ptq.formats.element import ElementFormat
from ptq.formats.minifloat import encode_float, round_to_float_grid


@dataclass(frozen=True)
class BlockScales:
    """Per-block scales of a 2-D tensor in :mod:`ptq.formats`' layout.

    Attributes:
        stored: ``[ceil(R / r), ceil(C / c)]`` fp32 values as ``QTensor.scale`` holds them.
        block: The block shape ``(r, c)`` the granularity lowers to.
        zero_point: Integer zero points (as fp32) with the shape of ``stored``, or None.
        global_scale: Per-tensor second level ``[1]`` (NVFP4), or None.
        channel_scale: Per-row real scale ``[R, 1]`` under per-block powers of two
            (ZeroQuant-FP M2, ``QuantFormat(channel_scale=True)``), or None.
    """

    stored: torch.Tensor
    block: tuple[int, int]
    zero_point: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None
    channel_scale: torch.Tensor | None = None

    def effective(self) -> torch.Tensor:
        """The per-block multiplier of the element values, in dequantization's op order:
        ``stored / global_scale``, ``stored * channel_scale`` or ``stored``."""
        if self.global_scale is not None:
            return self.stored / self.global_scale
        if self.channel_scale is not None:
            return self.stored * self.channel_scale
        return self.stored

    def expand(
        self, shape: torch.Size | tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Effective scale and zero point broadcast to every element of ``shape``."""
        scale = expand_blocks(self.effective(), self.block, shape)
        if self.zero_point is None:
            return scale, None
        return scale, expand_blocks(self.zero_point, self.block, shape)


def expand_blocks(
    values: torch.Tensor, block: tuple[int, int], shape: torch.Size | tuple[int, int]
) -> torch.Tensor:
    """Broadcast per-block ``values`` ``[R/r, C/c]`` to the element shape ``[R, C]``."""
    r, c = block
    full = values.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)
    return full[: shape[0], : shape[1]]


def block_scales(
    w: torch.Tensor,
    fmt: QuantFormat,
    *,
    block: tuple[int, int] | None = None,
    global_scale: torch.Tensor | None = None,
) -> BlockScales:
    """Scales that :func:`ptq.formats.quantize` picks for ``w`` [R, C].

    Args:
        w: The 2-D tensor (or a column slice of one).
        fmt: Target format.
        block: Force this block shape (used on column slices so that a slice narrower
            than the format's column block keeps the full tensor's block rows/cols).
        global_scale: Per-tensor second level to reuse (NVFP4); computed from ``w`` if
            the format has one and this is None.
    """
    if block is not None:
        fmt = fmt.with_granularity(PerBlock(*block))
    q = quantize(w, fmt, global_scale=global_scale)
    zp = None if q.zero_point is None else q.zero_point.float()
    block_shape = fmt.granularity.block_shape(*w.shape)
    return BlockScales(q.scale, block_shape, zp, q.global_scale, q.channel_scale)


def tensor_global_scale(w: torch.Tensor, fmt: QuantFormat) -> torch.Tensor | None:
    """The per-tensor second-level scale ``fmt`` derives from all of ``w`` (None if none)."""
    if not fmt.global_scale:
        return None
    whole = replace(fmt, granularity=PerTensor(), clip="none")
    return quantize(w, whole).global_scale


def round_with_scale(
    x: torch.Tensor,
    scale: torch.Tensor,
    element: ElementFormat,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Grid values ``q`` (code space, zero point included) of ``x`` for a given ``scale``.

    Integers: ``q = clamp(rne(x / s) + z, q_min, q_max)``; minifloats:
    ``q = round_to_float_grid(x / s)``. Zeros come out as ``+0.0`` so that encoding and
    decoding them is bit exact.
    """
    y = x / scale
    if isinstance(element, FloatFormat):
        return round_to_float_grid(y, element) + 0.0
    q = torch.round(y)
    if zero_point is not None:
        q = q + zero_point
    return torch.clamp(q, element.qmin, element.qmax) + 0.0


def dequantize_with_scale(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """``x^ = (q - z) * s``, the operations :func:`ptq.formats.dequantize` performs."""
    values = q if zero_point is None else q - zero_point
    return values * scale


def element_bounds(element: ElementFormat) -> tuple[float, float]:
    """Smallest and largest grid value (code space) of an element format."""
    if isinstance(element, FloatFormat):
        top = element.max_value
        return (-top if element.signed else 0.0), top
    return float(element.qmin), float(element.qmax)


def build_qtensor(q: torch.Tensor, scales: BlockScales, fmt: QuantFormat) -> QTensor:
    """Wrap grid values ``q`` (from :func:`round_with_scale`) and their scales in a QTensor."""
    element = fmt.element
    zp = None
    if isinstance(element, FloatFormat):
        codes = encode_float(q, element)
    else:
        assert isinstance(element, IntFormat)
        int_dtype = torch.int8 if element.bits <= 8 else torch.int32
        codes = q.to(int_dtype)
        if scales.zero_point is not None:
            zp = scales.zero_point.to(int_dtype)
    return QTensor(
        codes=codes,
        scale=scales.stored,
        fmt=fmt,
        zero_point=zp,
        global_scale=scales.global_scale,
        channel_scale=scales.channel_scale,
    )


def fake_quantize_ste(
    x: torch.Tensor,
    scale: torch.Tensor,
    element: ElementFormat,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable ``(q - z) * s`` with a straight-through estimator on the rounding.

    The clamp to the grid's range keeps its true gradient (zero outside the range), the
    rounding passes gradients unchanged (Bengio et al., 2013), and ``s`` receives the
    LSQ-style gradient through both ``x / s`` and ``* s`` (Esser et al., 2020).
    """
    y = x / scale
    if zero_point is not None:
        y = y + zero_point
    lo, hi = element_bounds(element)
    y = torch.clamp(y, lo, hi)
    if isinstance(element, FloatFormat):
        rounded = round_to_float_grid(y.detach(), element)
    else:
        rounded = torch.round(y.detach())
    q = y + (rounded - y).detach()
    return dequantize_with_scale(q, scale, zero_point)
