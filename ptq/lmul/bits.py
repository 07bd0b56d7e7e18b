"""The L-Mul product of two fp16 or bf16 numbers, emulated on their bit patterns.

For normal floating-point numbers ``x = (-1)^sx (1 + xm) 2^xe`` and
``y = (-1)^sy (1 + ym) 2^ye`` with ``m``-bit mantissas ``xm, ym`` in ``[0, 1)``, Luo &
Sun ("Addition is All You Need for Energy-efficient Language Models", 2024, eq. 3)
replace the mantissa product ``xm * ym`` of ``(1 + xm)(1 + ym)`` by a constant::

    L-Mul(x, y) = (-1)^(sx xor sy) (1 + xm + ym + 2^-l(m)) 2^(xe + ye),
    l(m) = m if m <= 3;  3 if m = 4;  4 if m > 4.

The paper realises this with one integer adder on the (exponent | mantissa) fields
of the two bit patterns ("leveraging the FP bit format for automatic carry
handling"): adding the fields adds the exponents and the mantissas, and the integer
part of ``s = xm + ym + 2^-l(m)`` (0, 1, or 2 when both mantissas are close to 1)
carries into the exponent::

    L-Mul(x, y) = (-1)^(sx xor sy) (1 + s - floor(s)) 2^(xe + ye + floor(s)).

That carried form is the definition used here: it is what the integer adder computes,
and it equals the paper's formula whenever ``s < 1`` (the literal formula would leave
a significand in ``[2, 3)``, which no float format holds). With ``c = 2^-l(m)`` the
relative error against the exact product is bounded by::

    (4c - (1 - c)^2) / (3 - c)^2  <=  L-Mul(x, y) / (x y) - 1  <=  c

(the minimum at ``xm = ym = (1 - c) / 2``, the maximum at ``xm = ym = 0`` and as both
mantissas approach 1); for fp16 and bf16 (``l = 4``) that is ``[-7.29 %, +6.25 %]``.

The result is formed in float32, the precision products are accumulated in: its
significand (at most ``m + 1`` bits) is exact there, so fp16 products never overflow
or underflow; bf16 products whose exponent leaves float32's normal range become
``±inf`` (above ``2^127``) or ``±0`` (below ``2^-126``). Special operands, defined
here since the paper does not treat them:

* zero and subnormal operands count as zero (subnormals are flushed, as a
  normal-only adder would treat them), and a product with a zero is ``±0``;
* a NaN operand, or infinity times zero, gives NaN;
* infinity times a nonzero number gives ``±inf``.

The sign is always ``sx xor sy`` (also for zeros and infinities).
"""

from __future__ import annotations

import torch

__all__ = ["LMUL_DTYPES", "FieldLayout", "field_layout", "lmul", "offset_exponent"]

#: 16-bit dtypes L-Mul is emulated for, with their (exponent, mantissa) bit counts.
LMUL_DTYPES: dict[torch.dtype, tuple[int, int]] = {
    torch.float16: (5, 10),
    torch.bfloat16: (8, 7),
}

_F32_MANT = 23
_F32_BIAS = 127
_ONE_BITS = _F32_BIAS << _F32_MANT  # float32 bit pattern of 1.0


def offset_exponent(mantissa_bits: int) -> int:
    """``l(m)`` of the paper: ``m`` for ``m <= 3``, ``3`` for ``m = 4``, ``4`` above."""
    if mantissa_bits < 1:
        raise ValueError(f"mantissa bits must be >= 1, got {mantissa_bits}")
    if mantissa_bits <= 3:
        return mantissa_bits
    return 3 if mantissa_bits == 4 else 4


class FieldLayout:
    """Constants of one 16-bit format, seen through its exact float32 widening.

    Attributes:
        exp_mask: The format's exponent field mask in its own 16-bit pattern.
        offset: ``2^-l(m)`` in units of the float32 mantissa LSB (``2^(23 - l)``).
        add: What adding two float32 fields needs besides the fields themselves:
            ``-bias`` (one of the two exponent biases) plus ``offset``.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        if dtype not in LMUL_DTYPES:
            raise ValueError(f"L-Mul is emulated for float16 and bfloat16, not {dtype}")
        exp_bits, mant_bits = LMUL_DTYPES[dtype]
        self.dtype = dtype
        self.mantissa_bits = mant_bits
        self.exp_mask = ((1 << exp_bits) - 1) << mant_bits
        self.offset = 1 << (_F32_MANT - offset_exponent(mant_bits))
        self.add = -_ONE_BITS + self.offset


def field_layout(dtype: torch.dtype) -> FieldLayout:
    """The :class:`FieldLayout` of ``dtype`` (float16 or bfloat16)."""
    return FieldLayout(dtype)


def classify(t: torch.Tensor, layout: FieldLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(is_zero, is_special)``: zero-or-subnormal, and inf-or-NaN, from ``t``'s own bits."""
    field = t.view(torch.int16).to(torch.int32) & layout.exp_mask
    return field == 0, field == layout.exp_mask


def lmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise ``L-Mul(x, y)`` as float32, for float16 or bfloat16 ``x`` and ``y``.

    Exact emulation of the definition in the module docstring (64-bit integer
    arithmetic on the float32 widenings of the bit patterns, so nothing wraps).
    ``x`` and ``y`` must share their dtype and broadcast.
    """
    if x.dtype != y.dtype:
        raise ValueError(f"L-Mul operands must share a dtype, got {x.dtype} and {y.dtype}")
    layout = field_layout(x.dtype)
    x_zero, x_special = classify(x, layout)
    y_zero, y_special = classify(y, layout)
    xb = x.float().view(torch.int32).to(torch.int64)
    yb = y.float().view(torch.int32).to(torch.int64)
    field_mask = (1 << 31) - 1
    negative = (xb < 0) ^ (yb < 0)
    fields = (xb & field_mask) + (yb & field_mask) + layout.add
    exponent = fields >> _F32_MANT  # biased float32 exponent of the carried result
    fields = torch.where(exponent >= 255, torch.full_like(fields, 255 << _F32_MANT), fields)
    fields = torch.where(exponent < 1, torch.zeros_like(fields), fields)
    zero = x_zero | y_zero
    inf = (x_special & (x.isinf())) | (y_special & (y.isinf()))
    nan = x.isnan() | y.isnan() | (inf & zero)
    fields = torch.where(zero, torch.zeros_like(fields), fields)
    fields = torch.where(inf, torch.full_like(fields, 255 << _F32_MANT), fields)
    bits = fields | (negative.to(torch.int64) << 31)
    # back to a signed 32-bit pattern (two's complement of the unsigned value)
    bits = torch.where(bits >= (1 << 31), bits - (1 << 32), bits).to(torch.int32)
    out = bits.view(torch.float32)
    return torch.where(nan, torch.full_like(out, float("nan")), out)
