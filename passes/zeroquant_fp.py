"""ZeroQuant-FP: FP4 weights with power-of-two scales so FP4 -> FP8 casts are exact.

Wu et al., "ZeroQuant-FP" (2023), section 4: a W4A8 kernel multiplies FP8 activations
by FP4 weights cast to FP8. The cast of ``q * f`` (``q`` on the E2M1 grid, ``f`` the
fine scale) is exact only if ``f`` is a power of two within the FP8 exponent range. Row
``r``, group ``g``, element max ``q_max`` (6 for E2M1), amaxes ``a_r``, ``a_rg``:

* **M1**: one power-of-two scale per row (or per group with ``group``):
  ``S_rg = 2^ceil(log2(a_rg / q_max))``. The per-row "real" scale is
  ``c_r = max_g S_rg`` (itself a power of two) and ``f_rg = S_rg / c_r``.
* **M2**: a real per-row scale ``c_r = a_r / q_max`` over per-group power-of-two
  factors ``f_rg = 2^ceil(log2(a_rg / (q_max c_r)))`` (so ``f_rg <= 1``).

Both then quantize ``q = round_E2M1(W / (f c))`` and dequantize ``W^ = q f c``. The
factor is clamped below at ``2^k_min``, the smallest power of two with ``q f`` exact in
the cast format for every element value ``q`` (E2M1 -> E4M3: ``2^-8``), so
``W^ / c_r`` is always an FP8 value: the exact-cast property. A group that hits the
clamp is quantized on a coarser grid (never clipped).

``ptq.formats`` expresses the result natively: M2 is ``QuantFormat(E2M1, PerGroup(g),
scale_format="pow2", channel_scale=True)`` and M1 is a ``pow2`` format; the returned
:class:`~ptq.formats.QTensor` dequantizes (``ptq.formats.dequantize``) to ``W^`` bit for
bit. (The formats engine does not apply the ``2^k_min`` clamp itself.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ptq.formats import FP4_E2M1, FP8_E4M3, FloatFormat, PerChannel, PerGroup, QTensor, QuantFormat
from ptq.formats.minifloat import encode_float, round_to_float_grid
from ptq.formats.scale_rules import pow2_cover
from ptq.modules import replace_module
from ptq.pipeline import Pass, PassContext, QuantState
from ptq.qlinear import QuantLinear
from ptq.steps import record_step

Variant = Literal["m1", "m2"]


@dataclass
class ZeroQuantFPWeight:
    """Result of :func:`zeroquant_fp_quantize`.

    Attributes:
        qtensor: Codes and scales in ``ptq.formats`` terms.
        weight: Dequantized weight ``W^ = q f c`` [R, C] (fp32).
        channel_scale: ``c_r`` [R, 1] (a power of two for M1).
        group_scale: Power-of-two factors ``f_rg`` [R, C / g] (all 1 per-channel M1).
    """

    qtensor: QTensor
    weight: torch.Tensor
    channel_scale: torch.Tensor
    group_scale: torch.Tensor


def min_exact_exponent(element: FloatFormat, cast: FloatFormat) -> int:
    """Smallest ``k`` with ``q * 2^k`` representable in ``cast`` for every ``q`` of ``element``.

    Raises:
        ValueError: ``element`` has more mantissa bits than ``cast`` (no exact cast).
    """
    if element.man_bits > cast.man_bits:
        raise ValueError(f"{element.name} has more mantissa bits than {cast.name}")
    low = math.log2(cast.min_subnormal) - math.log2(element.min_subnormal)
    return int(low)


def zeroquant_fp_quantize(
    w: torch.Tensor,
    variant: Variant = "m2",
    group: int | None = None,
    *,
    element: FloatFormat = FP4_E2M1,
    cast: FloatFormat = FP8_E4M3,
) -> ZeroQuantFPWeight:
    """Quantize ``w`` [R, C] to ``element`` with ZeroQuant-FP power-of-two scales."""
    if w.dim() != 2:
        raise ValueError(f"zeroquant_fp_quantize expects a 2-D weight, got {tuple(w.shape)}")
    if variant not in ("m1", "m2"):
        raise ValueError(f"ZeroQuant-FP variant must be 'm1' or 'm2', not {variant!r}")
    rows, cols = w.shape
    g = cols if group is None else group
    if g < 1 or cols % g:
        raise ValueError(f"group size {group} does not divide the input size {cols}")
    if variant == "m2" and group is None:
        raise ValueError("ZeroQuant-FP M2 needs a group size (per-group pow2 factors)")
    qmax = element.max_value
    wf = w.float()
    wb = wf.reshape(rows, cols // g, g)
    a_g = wb.abs().amax(dim=2)
    tiny = torch.finfo(torch.float32).tiny
    if variant == "m1":
        s_g = pow2_cover(a_g.clamp(min=tiny), qmax)
        c = s_g.amax(dim=1, keepdim=True)
    else:
        a_r = a_g.amax(dim=1, keepdim=True)
        c = a_r / qmax
        c = torch.where(c * qmax < a_r, torch.nextafter(c, a_r), c)
        c = torch.where(c > 0, c, torch.ones_like(c))
        s_g = c * pow2_cover((a_g / c).clamp(min=tiny), qmax)
    f = (s_g / c).clamp(min=2.0 ** min_exact_exponent(element, cast), max=1.0)
    eff = f * c
    q = round_to_float_grid(wb / eff[:, :, None], element)
    weight = (q * eff[:, :, None]).reshape(rows, cols)
    codes = encode_float(q.reshape(rows, cols), element)
    if variant == "m2":
        fmt = QuantFormat(element, PerGroup(g), scale_format="pow2", channel_scale=True)
        qt = QTensor(codes, f, fmt, channel_scale=c)
    else:
        gran = PerGroup(g) if group is not None else PerChannel()
        qt = QTensor(codes, eff, QuantFormat(element, gran, scale_format="pow2"))
    return ZeroQuantFPWeight(qt, weight, c, f)


@dataclass(frozen=True, kw_only=True)
class ZeroQuantFPConfig:
    """Args:
    variant: ``m1`` or ``m2``.
    group_size: Group of the power-of-two factors; default: the plan's group size.
    """

    variant: Variant = "m2"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.variant not in ("m1", "m2"):
            raise ValueError(f"ZeroQuant-FP variant must be 'm1' or 'm2', not {self.variant!r}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")


class ZeroQuantFPPass(Pass):
    """Weight pass: every planned Linear with a float element gets ZeroQuant-FP scales."""

    name: ClassVar[str] = "zeroquant_fp"
    ensures: ClassVar[tuple[str, ...]] = ("weights_quantized",)

    def __init__(self, config: ZeroQuantFPConfig | None = None) -> None:
        self.config = config or ZeroQuantFPConfig()

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        assert state.unit is not None
        for name in state.unit.layers:
            lp = state.plan.layers[name]
            module = state.model.get_submodule(lp.name)
            if isinstance(module, QuantLinear):
                continue
            if not isinstance(module, nn.Linear) or not isinstance(lp.weight.element, FloatFormat):
                raise ValueError(f"{lp.name}: ZeroQuant-FP needs an nn.Linear with a float format")
            group = self.config.group_size or lp.group_size
            res = zeroquant_fp_quantize(
                module.weight.detach(), self.config.variant, group, element=lp.weight.element
            )
            replace_module(
                state.model, lp.name, QuantLinear(res.qtensor, module.bias, lp.activation)
            )
            record_step(ctx.records, lp.name, self.name)
