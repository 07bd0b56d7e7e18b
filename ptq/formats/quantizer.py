"""Quantize and dequantize 2-D tensors with any element format, granularity and scale.

For a block ``B`` (from the granularity) with symmetric scaling (see
:mod:`ptq.formats.scale_rules` for how ``s_B`` is chosen)

    q   = round_to_grid(x / s_B)                 (nearest-even or stochastic, saturating)
    x^  = q * s_B

Asymmetric integers follow compressed-tensors' op order:
``s = enc((max - min) / (q_max - q_min))``, ``z = clamp(round(q_min - min / s))``,
``q = clamp(round(x / s + z))`` and ``x^ = (q - z) * s``. Blocks are reshaped views
``[R/r, r, C/c, c]`` with per-block values broadcast over them (no index expansion).
"""

from __future__ import annotations

import torch

from ptq.formats.clipping import mse_clipped_amax
from ptq.formats.element import ElementFormat, FloatFormat, IntFormat
from ptq.formats.minifloat import decode_float, encode_float, round_finite, round_to_float_grid
from ptq.formats.qformat import ClipSearch, QTensor, QuantFormat, ScaleRule
from ptq.formats.rounding import RoundingMode, check_finite, round_to_integer
from ptq.formats.scale_rules import (
    div_scalar,
    signed_peak,
    symmetric_scales,
    tensor_global_scale,
)
from ptq.formats.scales import encode_scale

__all__ = [
    "ClipSearch",
    "QTensor",
    "QuantFormat",
    "ScaleRule",
    "dequantize",
    "element_values",
    "expand_blocks",
    "fake_quantize",
    "quantize",
]


def to_blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """View ``x`` [R, C] as [R/r, r, C/c, c], zero-padding partial edge blocks."""
    r, c = block
    rows, cols = x.shape
    pad_r, pad_c = (-rows) % r, (-cols) % c
    if pad_r or pad_c:
        x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r))
    return x.reshape(x.shape[0] // r, r, x.shape[1] // c, c)


def from_blocks(xb: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: [R/r, r, C/c, c] back to [R, C] (padding dropped)."""
    full = xb.reshape(xb.shape[0] * xb.shape[1], xb.shape[2] * xb.shape[3])
    if full.shape != shape:
        full = full[: shape[0], : shape[1]]
    return full


def expand_blocks(s: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """Broadcast per-block values ``[R/r, C/c]`` back to the element shape ``[R, C]``."""
    r, c = block
    full = s[:, None, :, None].expand(s.shape[0], r, s.shape[1], c)
    return from_blocks(full, shape)


def int_code_dtype(element: IntFormat) -> torch.dtype:
    """int8/uint8 for <= 8-bit integer codes, int32 above."""
    if element.bits > 8:
        return torch.int32
    return torch.int8 if element.signed else torch.uint8


def _round_elements(
    y: torch.Tensor,
    element: ElementFormat,
    mode: RoundingMode,
    gen: torch.Generator | None,
    finite: bool,
) -> torch.Tensor:
    if isinstance(element, FloatFormat):
        if finite:
            return round_finite(y, element, mode, gen)
        return round_to_float_grid(y, element, mode, gen)
    # "+ 0.0" turns -0 into +0, as the integer codes hold it.
    return round_to_integer(y, mode, gen).clamp_(element.qmin, element.qmax).add_(0.0)


def _stats_input(x: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, bool]:
    """``x`` for scale statistics (non-finite zeroed) and whether ``x`` is all finite."""
    if fmt.nonfinite == "raise":
        check_finite(x)
        return x, True
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return x, True
    return torch.where(finite, x, 0.0), False


def _quantize_values(
    x: torch.Tensor,
    fmt: QuantFormat,
    rounding: RoundingMode,
    generator: torch.Generator | None,
    global_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, QTensor]:
    """Grid values ``q`` (blocked, fp32) and a QTensor without codes (codes = q's blocks)."""
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(x.shape)}")
    x = x.float()
    stats, finite = _stats_input(x, fmt)
    block = fmt.granularity.block_shape(*x.shape)
    sb = to_blocks(stats, block)
    xb = sb if finite else to_blocks(x, block)
    gs = None
    if fmt.global_scale:
        gs = global_scale.float().reshape(1) if global_scale is not None else None
        gs = gs if gs is not None else tensor_global_scale(stats, fmt)
    if not fmt.symmetric:
        assert isinstance(fmt.element, IntFormat)
        el = fmt.element
        lo = torch.clamp(sb.amin(dim=(1, 3)), max=0.0)
        hi = torch.clamp(sb.amax(dim=(1, 3)), min=0.0)
        s = div_scalar(hi - lo, el.qmax - el.qmin)
        scale = encode_scale(torch.where(s > 0, s, torch.ones_like(s)), fmt.scale_format)
        zp = torch.clamp(torch.round(el.qmin - lo / scale), el.qmin, el.qmax)
        y = xb / scale[:, None, :, None] + zp[:, None, :, None]
        q = torch.clamp(round_to_integer(y, rounding, generator), el.qmin, el.qmax) + 0.0
        zp_codes = zp.to(int_code_dtype(el))
        return q, QTensor(q, scale, fmt, zero_point=zp_codes)
    amax = signed_peak(sb) if fmt.scale_rule == "full_range" else sb.abs().amax(dim=(1, 3))
    if fmt.clip == "mse":
        amax = mse_clipped_amax(sb, fmt, amax, gs)
    stored, eff, cs = symmetric_scales(amax, fmt, gs)
    q = _round_elements(xb / eff[:, None, :, None], fmt.element, rounding, generator, finite)
    return q, QTensor(q, stored, fmt, global_scale=gs, channel_scale=cs)


def quantize(
    x: torch.Tensor,
    fmt: QuantFormat,
    *,
    rounding: RoundingMode = "nearest",
    generator: torch.Generator | None = None,
    global_scale: torch.Tensor | None = None,
) -> QTensor:
    """Quantize a 2-D tensor ``x`` [R, C] (weights: [out, in]) to ``fmt``.

    Args:
        x: Real tensor; NaN/Inf follow ``fmt.nonfinite``.
        fmt: Target format.
        rounding: ``nearest`` (ties to even) or seeded ``stochastic``.
        generator: RNG for stochastic rounding (on ``x``'s device).
        global_scale: Override the per-tensor second level (e.g. shared by q/k/v).
    """
    qb, qt = _quantize_values(x, fmt, rounding, generator, global_scale)
    q = from_blocks(qb, x.shape)
    if isinstance(fmt.element, FloatFormat):
        qt.codes = encode_float(q, fmt.element)
    else:
        qt.codes = q.to(int_code_dtype(fmt.element))
    return qt


def element_values(q: QTensor) -> torch.Tensor:
    """The real values of the codes (before scaling), zero point removed."""
    if isinstance(q.fmt.element, FloatFormat):
        return decode_float(q.codes, q.fmt.element)
    values = q.codes.float()
    if q.zero_point is not None:
        block = q.fmt.granularity.block_shape(*q.shape)
        values = values - expand_blocks(q.zero_point.float(), block, q.shape)
    return values


def dequantize(q: QTensor) -> torch.Tensor:
    """Decode ``q`` to fp32: ``values * scale`` (``* (scale / global)`` with two levels)."""
    block = q.fmt.granularity.block_shape(*q.shape)
    eff = q.effective_scale()[:, None, :, None]
    if isinstance(q.fmt.element, FloatFormat):
        vb = to_blocks(decode_float(q.codes, q.fmt.element), block)
    else:
        vb = to_blocks(q.codes.float(), block)
        if q.zero_point is not None:
            vb = vb - q.zero_point.float()[:, None, :, None]
    return from_blocks(vb * eff, q.shape)


def fake_quantize(
    x: torch.Tensor,
    fmt: QuantFormat,
    *,
    rounding: RoundingMode = "nearest",
    generator: torch.Generator | None = None,
    global_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` for 2-D ``x`` without building codes; dtype kept.

    Bit-identical to the two-step path (the grid values are exact in fp32).
    """
    qb, qt = _quantize_values(x, fmt, rounding, generator, global_scale)
    eff = qt.effective_scale()[:, None, :, None]
    if qt.zero_point is not None:
        qb = qb.sub(qt.zero_point.float()[:, None, :, None])
    return from_blocks(qb.mul_(eff), x.shape).to(x.dtype)
