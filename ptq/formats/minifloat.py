"""Minifloat rounding, encoding and decoding for any :class:`FloatFormat` of <= 8 bits.

Rounding maps ``|x|`` to the grid of its binade: ``e = max(floor(log2|x|), emin)``,
``ulp = 2^(e - M)``, ``q = rne(|x| / ulp) * ulp``, then saturates to the largest finite
value (never Inf/NaN from finite input, as the OCP MX spec requires for conversions with
saturation). Decoding goes through a 2^bits lookup table built from the bit-level
definition, so it is exact by construction.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ptq.formats.element import FloatFormat
from ptq.formats.rounding import RoundingMode, round_to_integer


def round_to_float_grid(
    x: torch.Tensor,
    fmt: FloatFormat,
    mode: RoundingMode = "nearest",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round fp32 ``x`` to the nearest value of ``fmt`` with saturation (result in fp32)."""
    x = x.float()
    a = x.abs()
    _, exp = torch.frexp(a)  # a = m * 2^exp, m in [0.5, 1)
    e = torch.clamp(exp - 1, min=fmt.emin)
    ulp = torch.ldexp(torch.ones_like(a), (e - fmt.man_bits).to(torch.int32))
    q = round_to_integer(a / ulp, mode, generator) * ulp
    q = torch.clamp(q, max=fmt.max_value)
    if not fmt.signed:
        q = torch.where(x < 0, torch.zeros_like(q), q)
        return q
    q = torch.copysign(q, x)
    return torch.where(torch.isnan(x), x, q)


@lru_cache(maxsize=64)
def _decode_table(fmt: FloatFormat) -> tuple[float, ...]:
    values = []
    m_count = 2**fmt.man_bits
    top_exp = 2**fmt.exp_bits - 1
    for code in range(2**fmt.bits):
        sign_bit = (code >> (fmt.bits - 1)) & 1 if fmt.signed else 0
        e = (code >> fmt.man_bits) & top_exp
        m = code & (m_count - 1)
        if e == 0:
            mag = math.ldexp(m / m_count, fmt.emin)
        else:
            mag = math.ldexp(1 + m / m_count, e - fmt.exp_bias)
        if fmt.inf_nan == "ieee" and e == top_exp:
            mag = math.inf if m == 0 else math.nan
        elif fmt.inf_nan == "fn" and e == top_exp and m == m_count - 1:
            mag = math.nan
        elif fmt.inf_nan == "fnuz" and sign_bit and e == 0 and m == 0:
            mag, sign_bit = math.nan, 0
        values.append(-mag if sign_bit else mag)
    return tuple(values)


def decode_float(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Bit codes (any integer dtype, low ``fmt.bits`` bits used) to fp32 values."""
    table = torch.tensor(_decode_table(fmt), dtype=torch.float32, device=codes.device)
    return table[codes.long() & (2**fmt.bits - 1)]


def encode_float(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """fp32 values that lie on ``fmt``'s grid to uint8 bit codes.

    Values off the grid are rounded to nearest-even first. NaN maps to the format's NaN
    code; formats without NaN raise.
    """
    v = round_to_float_grid(values, fmt)
    a = v.abs()
    _, exp = torch.frexp(a)
    e_unb = exp - 1
    normal = e_unb >= fmt.emin
    e_field = torch.where(normal, e_unb + fmt.exp_bias, torch.zeros_like(e_unb))
    scale_exp = torch.where(normal, e_unb, torch.full_like(e_unb, fmt.emin))
    frac = torch.ldexp(a, (fmt.man_bits - scale_exp).to(torch.int32))
    m_field = torch.where(normal, frac - 2**fmt.man_bits, frac).round().to(torch.int64)
    e_field = torch.where(a == 0, torch.zeros_like(e_field), e_field)
    m_field = torch.where(a == 0, torch.zeros_like(m_field), m_field)
    code = (e_field.to(torch.int64) << fmt.man_bits) | m_field
    if fmt.signed:
        negative = torch.signbit(v)
        if fmt.inf_nan == "fnuz":
            negative = negative & (a != 0)
        code = code | (negative.to(torch.int64) << (fmt.bits - 1))
    nan = torch.isnan(values)
    if bool(nan.any()):
        if fmt.inf_nan == "none":
            raise ValueError(f"{fmt.name} has no NaN encoding")
        code = torch.where(nan, torch.tensor(_nan_code(fmt), device=code.device), code)
    return code.to(torch.uint8)


def _nan_code(fmt: FloatFormat) -> int:
    if fmt.inf_nan == "fnuz":
        return 1 << (fmt.bits - 1)
    return 2**fmt.bits - 1 if fmt.signed else 2**fmt.bits - 1
