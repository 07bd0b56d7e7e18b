"""Quantize and dequantize 2-D tensors with any element format, granularity and scale.

For a block ``B`` (from the granularity) with symmetric scaling the maths is

    s_B = encode_scale(amax(B) / q_max)          (amax rule)
    s_B = 2^(floor(log2 amax(B)) - emax_elem)    (OCP MX rule, E8M0)
    q   = round_to_grid(x / s_B)                 (nearest-even, saturating)
    x^  = q * s_B

and, with a second level (NVFP4), a per-tensor ``g = q_max * scale_max / amax(W)`` so that
the stored block scale ``t_B = e4m3(amax(B) / q_max * g)`` and ``x^ = q * (t_B / g)``.
Asymmetric integers use ``s = (max - min) / (q_max - q_min)``, ``z = round(q_min - min / s)``
and ``x^ = (q - z) * s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from ptq.formats.element import ElementFormat, FloatFormat, IntFormat
from ptq.formats.granularity import Granularity, PerChannel, PerTensor
from ptq.formats.minifloat import decode_float, encode_float, round_to_float_grid
from ptq.formats.rounding import RoundingMode, check_finite, round_to_integer
from ptq.formats.scales import E4M3_SCALE, ScaleFormat, encode_scale

ScaleRule = Literal["amax", "mx", "mx_round_up"]
ClipSearch = Literal["none", "mse"]


@dataclass(frozen=True)
class QuantFormat:
    """A complete tensor quantization format: element grid, granularity and scales.

    Args:
        element: The element format (integer or minifloat).
        granularity: Which elements share a scale.
        symmetric: Integer formats only: no zero point if True.
        scale_format: How scales are stored (rounded onto that grid).
        scale_rule: ``amax`` (``s = amax / q_max``) or the OCP MX shared-exponent rule
            (``mx``; ``mx_round_up`` takes the ceiling so no element clips).
        global_scale: Add an fp32 per-tensor second level (NVFP4).
        clip: ``mse`` searches the clip ratio per block minimising squared error.
        name: Display name for presets.
    """

    element: ElementFormat
    granularity: Granularity = field(default_factory=PerChannel)
    symmetric: bool = True
    scale_format: ScaleFormat = "fp32"
    scale_rule: ScaleRule = "amax"
    global_scale: bool = False
    clip: ClipSearch = "none"
    name: str = ""

    def __post_init__(self) -> None:
        if not self.symmetric and not isinstance(self.element, IntFormat):
            raise ValueError("asymmetric (zero-point) quantization needs an integer element")
        if self.scale_rule != "amax" and self.scale_format not in ("e8m0", "pow2"):
            raise ValueError(f"scale rule {self.scale_rule!r} needs an e8m0 or pow2 scale")

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
    already on the scale format's grid, shape ``[ceil(R / r), ceil(C / c)]``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    fmt: QuantFormat
    zero_point: torch.Tensor | None = None
    global_scale: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape


def _element_emax(element: ElementFormat) -> int:
    if isinstance(element, FloatFormat):
        return element.emax
    return element.bits - 2  # MXINT: q * 2^-(bits-2), largest magnitude just under 2


def _blocked(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """View ``x`` [R, C] as [R/r, r, C/c, c], zero-padding partial edge blocks."""
    r, c = block
    rows, cols = x.shape
    pad_r, pad_c = (-rows) % r, (-cols) % c
    if pad_r or pad_c:
        x = torch.nn.functional.pad(x, (0, pad_c, 0, pad_r))
    return x.reshape(x.shape[0] // r, r, x.shape[1] // c, c)


def expand_blocks(s: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    """Broadcast per-block values ``[R/r, C/c]`` back to the element shape ``[R, C]``."""
    r, c = block
    full = s.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)
    return full[: shape[0], : shape[1]]


def _round_elements(
    y: torch.Tensor, element: ElementFormat, mode: RoundingMode, gen: torch.Generator | None
) -> torch.Tensor:
    if isinstance(element, FloatFormat):
        return round_to_float_grid(y, element, mode, gen)
    return torch.clamp(round_to_integer(y, mode, gen), element.qmin, element.qmax)


def _symmetric_scales(
    xb: torch.Tensor, fmt: QuantFormat, amax: torch.Tensor, global_scale: torch.Tensor | None
) -> torch.Tensor:
    qmax = fmt.element.max_value
    if fmt.scale_rule in ("mx", "mx_round_up"):
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        e = torch.floor(torch.log2(safe)) - _element_emax(fmt.element)
        if fmt.scale_rule == "mx_round_up":
            e = torch.ceil(torch.log2(safe / qmax))
        return torch.exp2(torch.clamp(e, -127, 127))
    if global_scale is not None:
        stored = encode_scale(amax / qmax * global_scale, fmt.scale_format)
        return stored / global_scale
    s = amax / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    return encode_scale(s, fmt.scale_format)


def _tensor_global_scale(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    amax = x.abs().amax().float().clamp(min=torch.finfo(torch.float32).tiny)
    scale_max = E4M3_SCALE.max_value if fmt.scale_format == "e4m3" else 1.0
    return (fmt.element.max_value * scale_max / amax).reshape(1)


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
        x: Finite real tensor; NaN/Inf raise ``ValueError``.
        fmt: Target format.
        rounding: ``nearest`` (ties to even) or seeded ``stochastic``.
        generator: RNG for stochastic rounding.
        global_scale: Override the per-tensor second level (e.g. shared by q/k/v).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(x.shape)}")
    check_finite(x)
    x = x.float()
    block = fmt.granularity.block_shape(*x.shape)
    xb = _blocked(x, block)
    gs = None
    if fmt.global_scale:
        gs = global_scale if global_scale is not None else _tensor_global_scale(x, fmt)
    if fmt.symmetric:
        amax = xb.abs().amax(dim=(1, 3))
        if fmt.clip == "mse":
            amax = _mse_clipped_amax(xb, fmt, amax, gs)
        scale = _symmetric_scales(xb, fmt, amax, gs)
        s_full = expand_blocks(scale, block, x.shape)
        q = _round_elements(x / s_full, fmt.element, rounding, generator)
        zp = None
    else:
        assert isinstance(fmt.element, IntFormat)
        lo = torch.clamp(xb.amin(dim=(1, 3)), max=0.0)
        hi = torch.clamp(xb.amax(dim=(1, 3)), min=0.0)
        el = fmt.element
        scale = (hi - lo) / (el.qmax - el.qmin)
        scale = encode_scale(torch.where(scale > 0, scale, torch.ones_like(scale)), fmt.scale_format)
        zp = torch.clamp(torch.round(el.qmin - lo / scale), el.qmin, el.qmax)
        s_full = expand_blocks(scale, block, x.shape)
        z_full = expand_blocks(zp, block, x.shape)
        q = torch.clamp(round_to_integer(x / s_full, rounding, generator) + z_full, el.qmin, el.qmax)
        zp = zp.to(torch.int8 if el.bits <= 8 else torch.int32)
    if isinstance(fmt.element, FloatFormat):
        codes = encode_float(q, fmt.element)
    else:
        codes = q.to(torch.int8 if fmt.element.bits <= 8 else torch.int32)
    stored = scale * gs if gs is not None else scale
    return QTensor(codes=codes, scale=stored, fmt=fmt, zero_point=zp, global_scale=gs)


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
    scale = q.scale if q.global_scale is None else q.scale / q.global_scale
    return element_values(q) * expand_blocks(scale, block, q.shape)


def fake_quantize(x: torch.Tensor, fmt: QuantFormat, **kwargs: object) -> torch.Tensor:
    """``dequantize(quantize(x))`` for 2-D ``x``; the dtype of ``x`` is kept."""
    return dequantize(quantize(x, fmt, **kwargs)).to(x.dtype)  # type: ignore[arg-type]


def _mse_clipped_amax(
    xb: torch.Tensor,
    fmt: QuantFormat,
    amax: torch.Tensor,
    gs: torch.Tensor | None,
    grid: int = 20,
    min_ratio: float = 0.5,
) -> torch.Tensor:
    """Per block, the clipped ``amax = r * amax`` (``r`` on a grid) with least squared error."""
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    block = (xb.shape[1], xb.shape[3])
    for i in range(grid):
        ratio = 1.0 - (1.0 - min_ratio) * i / max(grid - 1, 1)
        cand = amax * ratio
        s = _symmetric_scales(xb, fmt, cand, gs)
        s4 = s[:, None, :, None]
        q = _round_elements(xb / s4, fmt.element, "nearest", None) * s4
        err = (q - xb).pow(2).sum(dim=(1, 3))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand, best)
    del block
    return best


def per_token(element: ElementFormat) -> QuantFormat:
    """Dynamic per-token (per-row) symmetric activation format."""
    return QuantFormat(element, PerChannel(axis=0))


def per_tensor(element: ElementFormat) -> QuantFormat:
    """Per-tensor symmetric format."""
    return QuantFormat(element, PerTensor())
