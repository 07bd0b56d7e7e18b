"""Minifloat rounding, encoding and decoding for any :class:`FloatFormat` of <= 8 bits.

Rounding maps ``|x|`` onto the grid of its binade. With ``e = max(floor(log2|x|), emin)``
and ``ulp = 2^(e - M)``,

    q = rne(|x| / ulp) * ulp          (or floor(|x| / ulp + u), u ~ U[0, 1), stochastic)

then saturates to the largest finite value: finite input never becomes Inf/NaN (the
OCP MX v1.0 "conversion with saturation"). ``floor(log2|x|)`` is read exactly from the
fp32 exponent bits, and ``ulp`` is a power of two, so every step is exact in fp32.
Non-finite input is never turned into a number: NaN stays NaN, Inf stays Inf where the
format has Inf and becomes NaN otherwise, and a format with neither raises.

Decoding goes through a ``2^bits`` lookup table built from the bit-level definition, so
it is exact by construction.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ptq.formats.element import FloatFormat
from ptq.formats.rounding import RoundingMode, round_to_integer

_NATIVE_DTYPES: dict[tuple[int, int, int, str], torch.dtype] = {
    (4, 3, 7, "fn"): torch.float8_e4m3fn,
    (5, 2, 15, "ieee"): torch.float8_e5m2,
    (4, 3, 8, "fnuz"): torch.float8_e4m3fnuz,
    (5, 2, 16, "fnuz"): torch.float8_e5m2fnuz,
}


def native_dtype(fmt: FloatFormat) -> torch.dtype | None:
    """The torch float8 dtype with exactly ``fmt``'s grid, if there is one."""
    if not fmt.signed:
        return None
    return _NATIVE_DTYPES.get((fmt.exp_bits, fmt.man_bits, fmt.exp_bias, fmt.inf_nan))


def _binade_ulp(a: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``2^(max(floor(log2 a), emin) - M)`` for non-negative fp32 ``a``, from its bits."""
    exp = (a.view(torch.int32) >> 23) - 127  # fp32 subnormals give -127 < emin: clamped
    e = torch.clamp(exp, min=fmt.emin) - fmt.man_bits
    return ((e + 127) << 23).view(torch.float32)


def round_finite(
    x: torch.Tensor,
    fmt: FloatFormat,
    mode: RoundingMode = "nearest",
    generator: torch.Generator | None = None,
    native: bool = True,
) -> torch.Tensor:
    """Round finite fp32 ``x`` onto ``fmt`` with saturation (no NaN/Inf handling).

    Args:
        x: fp32 tensor known to be finite.
        fmt: Target grid.
        mode: ``nearest`` (ties to even) or ``stochastic``.
        generator: RNG for stochastic rounding.
        native: Use torch's float8 cast when ``fmt`` has a torch dtype (same result,
            faster); ``False`` forces the generic path (used to test one against the other).
    """
    if mode == "nearest" and native:
        dtype = native_dtype(fmt)
        if dtype is not None:
            q = x.clamp(-fmt.max_value, fmt.max_value).to(dtype).float()
            return q + 0.0 if fmt.inf_nan == "fnuz" else q  # fnuz has no -0
    a = x.abs()
    ulp = _binade_ulp(a, fmt)
    q = round_to_integer(a.div_(ulp), mode, generator).mul_(ulp).clamp_(max=fmt.max_value)
    if not fmt.signed:
        return q.masked_fill_(x <= 0, 0.0)
    q = q.copysign_(x)
    return q.add_(0.0) if fmt.inf_nan == "fnuz" else q


def round_to_float_grid(
    x: torch.Tensor,
    fmt: FloatFormat,
    mode: RoundingMode = "nearest",
    generator: torch.Generator | None = None,
    native: bool = True,
) -> torch.Tensor:
    """Round ``x`` to ``fmt`` (result in fp32), propagating NaN/Inf explicitly.

    Finite values saturate to ``+-max_value``. NaN stays NaN; ``+-Inf`` stays ``+-Inf``
    in IEEE-style formats and becomes NaN in finite-only ones.

    Raises:
        ValueError: ``x`` holds NaN/Inf and ``fmt`` has no NaN encoding.
    """
    x = x.float()
    finite = torch.isfinite(x)
    all_finite = bool(finite.all())
    q = round_finite(x if all_finite else torch.where(finite, x, 0.0), fmt, mode, generator, native)
    if all_finite:
        return q
    if not fmt.has_nan:
        raise ValueError(f"{fmt.name} has no NaN/Inf encoding; cannot propagate non-finite input")
    special = x if fmt.has_inf else torch.full_like(x, math.nan)
    if not fmt.signed:
        special = torch.where(x > 0, special, torch.full_like(x, math.nan))
    return torch.where(finite, q, special)


@lru_cache(maxsize=64)
def decode_table(fmt: FloatFormat) -> tuple[float, ...]:
    """Value of every code ``0 .. 2^bits - 1`` from the bit-level definition."""
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
    table = torch.tensor(decode_table(fmt), dtype=torch.float32, device=codes.device)
    return table[codes.long() & (2**fmt.bits - 1)]


def encode_float(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """fp32 values to uint8 bit codes of ``fmt``.

    Values off the grid are rounded to nearest-even (saturating) first. NaN maps to the
    format's NaN code, Inf to its Inf code (or NaN where the format has no Inf).

    Raises:
        ValueError: Non-finite input and ``fmt`` has no NaN encoding.
    """
    v = round_to_float_grid(values, fmt)
    a = v.abs()
    bits = a.view(torch.int32)
    e_unb = (bits >> 23) - 127
    normal = e_unb >= fmt.emin
    # Normal: exponent field e + bias, mantissa = top M bits of the fp32 mantissa.
    man_normal = (bits & 0x7FFFFF) >> (23 - fmt.man_bits)
    code_normal = ((e_unb + fmt.exp_bias) << fmt.man_bits) | man_normal
    # Subnormal (and zero): mantissa = a / min_subnormal, an exact small integer.
    code_sub = (a / fmt.min_subnormal).to(torch.int32)
    code = torch.where(normal, code_normal, code_sub)
    if fmt.signed:
        code = code | (torch.signbit(v).to(torch.int32) << (fmt.bits - 1))
    finite = torch.isfinite(v)
    if not bool(finite.all()):
        nan_code = torch.full_like(code, nan_code_of(fmt))
        special = torch.where(torch.isnan(v), nan_code, code)
        if fmt.has_inf:
            inf_code = (fmt.max_exp_code + 1) << fmt.man_bits
            sign = torch.signbit(v).to(torch.int32) << (fmt.bits - 1)
            special = torch.where(torch.isinf(v), inf_code | sign, special)
        code = torch.where(finite, code, special)
    return code.to(torch.uint8)


def nan_code_of(fmt: FloatFormat) -> int:
    """The canonical NaN code of ``fmt`` (all ones, or 0x80 for ``fnuz``)."""
    if not fmt.has_nan:
        raise ValueError(f"{fmt.name} has no NaN encoding")
    if fmt.inf_nan == "fnuz":
        return 1 << (fmt.bits - 1)
    return 2**fmt.bits - 1
