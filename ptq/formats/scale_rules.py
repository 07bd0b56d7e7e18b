"""Scale choice for symmetric formats: the amax rule, the OCP MX rule, two-level scales.

For a block ``B`` with ``a = amax(B)`` and element maximum ``q_max``:

* ``amax``: ``s = enc(a / q_max)``; power-of-two encodings take the smallest ``2^k``
  with ``a <= q_max * 2^k`` (never clips).
* ``mx`` (OCP MX v1.0 section 6.3): ``s = 2^clip(floor(log2 a) - emax_elem, -127, 127)``;
  elements above ``q_max`` saturate. ``mx_round_up``: the smallest ``2^k`` covering
  ``a`` (no clipping), as some later MX work does.
* NVFP4 (two levels): ``g = q_max * 448 / amax(W)``, ``t_B = e4m3(a / q_max * g)``,
  effective ``t_B / g`` (compressed-tensors' op order).
* ``full_range`` (signed integers of ``b`` bits): with ``v*`` the element of largest
  magnitude, signed (the negative one on a tie), ``s = v* / -2^(b-1)`` so that ``v*``
  decodes exactly from code ``-2^(b-1)`` and all ``2^b`` codes are in use (the element
  ``-v*`` saturates to ``2^(b-1) - 1``). ``s`` is negative when ``v* > 0``; plain float
  encodings keep the sign (``|s|`` rounded, sign restored). This is ONNX Runtime's
  symmetric block quantizer (``MatMulNBitsQuantizer`` RTN).
* ``span`` (signed integers): ``s = a / ((q_max - q_min) / 2)`` (``a / 7.5`` for INT4),
  the rule compressed-tensors' observers use for symmetric integers: ``-a`` lands on
  code ``-2^(b-1)`` (``-7.5`` rounds to even ``-8``) and ``+a`` saturates to
  ``2^(b-1) - 1``, a finer grid than ``amax`` at the cost of one clipped half-step.
* ZeroQuant-FP M2 (Wu et al., "ZeroQuant-FP", 2023): ``c_r = amax(row) / q_max`` real,
  ``f_rg`` the smallest power of two with ``a_rg <= q_max * f_rg * c_r``; effective
  ``f_rg * c_r``. M1 is plain ``pow2`` per-channel scales.
"""

from __future__ import annotations

import torch

from ptq.formats.element import ElementFormat, FloatFormat, IntFormat
from ptq.formats.qformat import QuantFormat
from ptq.formats.scales import E8M0_BIAS, SCALE_MAX, encode_scale, pow2_exponent


def element_emax(element: ElementFormat) -> int:
    """Exponent of the element's largest normal (MXINT: ``bits - 2``, implicit 2^-(b-2))."""
    if isinstance(element, FloatFormat):
        return element.emax
    return element.bits - 2


def div_scalar(a: torch.Tensor, d: float) -> torch.Tensor:
    """``a / d`` correctly rounded on every device.

    CUDA divides a tensor by a Python scalar as ``a * (1 / d)``, which differs from the
    CPU's true division in the last place for ``d`` such as 6 or 7; dividing by a tensor
    of ``d`` is IEEE division on both, so CPU and GPU scales agree bit for bit.
    """
    return a / torch.full_like(a, d)


def pow2_cover(a: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest ``2^k`` (``k`` in -127..127) with ``a <= qmax * 2^k``, exactly."""
    k = pow2_exponent(div_scalar(a, qmax), round_up=True)
    k = torch.where(qmax * torch.ldexp(torch.ones_like(a), k) < a, k + 1, k)
    return torch.ldexp(torch.ones_like(a), torch.clamp(k, -E8M0_BIAS, E8M0_BIAS))


def _pow2_factor(a: torch.Tensor, row: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest ``f = 2^k`` with ``a <= qmax * (f * row)`` as computed in fp32."""
    k = pow2_exponent(a / (qmax * row), round_up=True) - 1
    one = torch.ones_like(a)
    for _ in range(3):  # k - 1, k, k + 1 around the rounded estimate
        f = torch.ldexp(one, torch.clamp(k, -E8M0_BIAS, E8M0_BIAS))
        k = torch.where(qmax * (f * row) < a, k + 1, k)
    return torch.ldexp(one, torch.clamp(k, -E8M0_BIAS, E8M0_BIAS))


def signed_peak(xb: torch.Tensor) -> torch.Tensor:
    """Per block of ``xb`` [R/r, r, C/c, c] the element of largest magnitude, signed.

    ``v* = max`` if ``max > -min`` else ``min``: on a tie the negative element wins.
    """
    lo = xb.amin(dim=(1, 3))
    hi = xb.amax(dim=(1, 3))
    return torch.where(hi > -lo, hi, lo)


def full_range_scales(peak: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``s = v* / -2^(b-1)`` per block from signed peaks ``v*`` (1 for all-zero blocks).

    Dividing by a power of two is exact (barring underflow) on every device; the
    magnitude is rounded onto ``fmt.scale_format`` and the sign kept.
    """
    s = peak.float() / float(-(2 ** (fmt.element.bits - 1)))
    s = torch.where(s != 0, s, torch.ones_like(s))
    return torch.copysign(encode_scale(s.abs(), fmt.scale_format), s)


def tensor_global_scale(x: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """NVFP4's per-tensor ``g = q_max * scale_max / amax(x)`` (fp32, shape [1])."""
    amax = x.abs().amax().float().clamp(min=torch.finfo(torch.float32).tiny)
    scale_max = SCALE_MAX[fmt.scale_format] if fmt.scale_format in ("e4m3", "ue5m3") else 1.0
    return (fmt.element.max_value * scale_max / amax).reshape(1)


def symmetric_scales(
    amax: torch.Tensor, fmt: QuantFormat, global_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-block scales from per-block ``amax`` ``[R/r, C/c]``.

    For the ``full_range`` rule ``amax`` is the signed peak (:func:`signed_peak`).

    Returns:
        ``(stored, effective, channel_scale)``: the stored scale values (what
        ``QTensor.scale`` holds), the multiplier used for ``x / s`` and ``q * s``, and
        M2's per-row real scale (else ``None``).
    """
    qmax = fmt.element.max_value
    amax = amax.float()
    if fmt.scale_rule == "full_range":  # ``amax`` holds the signed peaks here
        s = full_range_scales(amax, fmt)
        return s, s, None
    if fmt.scale_rule == "span":
        el = fmt.element
        assert isinstance(el, IntFormat)
        s = div_scalar(amax, (el.qmax - el.qmin) / 2)
        stored = encode_scale(torch.where(s > 0, s, torch.ones_like(s)), fmt.scale_format)
        return stored, stored, None
    if fmt.scale_rule == "mx":
        e = pow2_exponent(amax, round_up=False) - element_emax(fmt.element)
        s = torch.ldexp(torch.ones_like(amax), torch.clamp(e, -E8M0_BIAS, E8M0_BIAS))
        return s, s, None
    if fmt.scale_rule == "mx_round_up" or (
        fmt.scale_format in ("e8m0", "pow2") and not fmt.channel_scale
    ):
        s = pow2_cover(amax, qmax)
        return s, s, None
    if fmt.channel_scale:
        row_amax = amax.amax(dim=1, keepdim=True)
        row = div_scalar(row_amax, qmax)
        row = torch.where(row * qmax < row_amax, torch.nextafter(row, row_amax), row)
        row = torch.where(row > 0, row, torch.ones_like(row))
        factor = _pow2_factor(amax, row, qmax)
        return factor, factor * row, row
    if global_scale is not None:
        stored = encode_scale(div_scalar(amax, qmax) * global_scale, fmt.scale_format)
        return stored, stored / global_scale, None
    s = div_scalar(amax, qmax)
    stored = encode_scale(torch.where(s > 0, s, torch.ones_like(s)), fmt.scale_format)
    return stored, stored, None
