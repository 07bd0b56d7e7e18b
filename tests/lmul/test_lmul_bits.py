"""L-Mul products against a pure-Python scalar reference and the error bound.

The reference decodes each 16-bit pattern into sign, exponent and mantissa with
integer arithmetic and evaluates the paper's definition with exact fractions; the
torch emulation works on float32 bit patterns. Both follow the definition in
``ptq.lmul.bits`` (carry into the exponent, fp32 result, flushed subnormals).
"""

from __future__ import annotations

import math
import random
import struct
from fractions import Fraction

import pytest
import torch

from ptq.lmul import lmul, offset_exponent

FORMATS = {torch.float16: (5, 10), torch.bfloat16: (8, 7)}


def _to_f32(value: Fraction | float) -> float:
    """Round to float32 (exact here: the significand has at most 12 bits)."""
    return float(struct.unpack("<f", struct.pack("<f", float(value)))[0])


def reference_lmul(xbits: int, ybits: int, exp_bits: int, mant_bits: int) -> float:
    """L-Mul of two 16-bit patterns as a Python float (a float32 value), or NaN."""
    bias = (1 << (exp_bits - 1)) - 1
    top = (1 << exp_bits) - 1

    def decode(bits: int) -> tuple[int, int, int]:
        return bits >> 15, (bits >> mant_bits) & top, bits & ((1 << mant_bits) - 1)

    (sx, ex, mx), (sy, ey, my) = decode(xbits), decode(ybits)
    sign = -1.0 if sx ^ sy else 1.0
    x_nan = ex == top and mx != 0
    y_nan = ey == top and my != 0
    x_inf = ex == top and mx == 0
    y_inf = ey == top and my == 0
    x_zero, y_zero = ex == 0, ey == 0  # zeros and (flushed) subnormals
    if x_nan or y_nan or (x_inf and y_zero) or (y_inf and x_zero):
        return math.nan
    if x_inf or y_inf:
        return sign * math.inf
    if x_zero or y_zero:
        return sign * 0.0
    s = Fraction(mx + my, 1 << mant_bits) + Fraction(1, 1 << offset_exponent(mant_bits))
    e = (ex - bias) + (ey - bias)
    # the integer adder carries floor(s) (0, 1 or 2) into the exponent
    carry = int(s)
    significand, e = 1 + (s - carry), e + carry
    if e > 127:
        return sign * math.inf
    if e < -126:
        return sign * 0.0
    return sign * _to_f32(significand * Fraction(2) ** e)


def _sample_patterns(exp_bits: int, mant_bits: int, n: int, seed: int) -> list[int]:
    top = (1 << exp_bits) - 1
    specials = [
        0,  # +0
        1,  # smallest subnormal
        (1 << mant_bits) - 1,  # largest subnormal
        1 << mant_bits,  # smallest normal
        (top - 1) << mant_bits | ((1 << mant_bits) - 1),  # largest finite
        top << mant_bits,  # inf
        top << mant_bits | 1,  # NaN
        (((1 << (exp_bits - 1)) - 1) << mant_bits),  # 1.0
        (((1 << (exp_bits - 1)) - 1) << mant_bits) | ((1 << mant_bits) - 1),  # 1.99..
    ]
    specials += [p | 0x8000 for p in specials]
    rng = random.Random(seed)
    return specials + [rng.randrange(1 << 16) for _ in range(n - len(specials))]


def _as_tensor(patterns: list[int], dtype: torch.dtype) -> torch.Tensor:
    signed = [p - (1 << 16) if p >= 1 << 15 else p for p in patterns]
    return torch.tensor(signed, dtype=torch.int16).view(dtype)


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_all_pairs_of_a_random_sample_match_the_scalar_reference(dtype: torch.dtype) -> None:
    exp_bits, mant_bits = FORMATS[dtype]
    patterns = _sample_patterns(exp_bits, mant_bits, 200, seed=22)
    t = _as_tensor(patterns, dtype)
    got = lmul(t[:, None], t[None, :])
    want = torch.tensor(
        [[reference_lmul(a, b, exp_bits, mant_bits) for b in patterns] for a in patterns],
        dtype=torch.float32,
    )
    both_nan = got.isnan() & want.isnan()
    assert torch.equal(got.isnan(), want.isnan())
    # bit for bit, signed zeros and infinities included
    g = torch.where(both_nan, 0.0, got).view(torch.int32)
    w = torch.where(both_nan, 0.0, want).view(torch.int32)
    assert torch.equal(g, w), f"{int((g != w).sum())} of {g.numel()} products differ"


def test_reference_follows_the_paper_formula_without_carry() -> None:
    # 1.25 * 1.5 in fp16: xm + ym + 2^-4 = 0.8125 < 1 -> (1 + 0.8125) * 2^0
    x = _as_tensor([0x3D00], torch.float16)
    y = _as_tensor([0x3E00], torch.float16)
    assert float(lmul(x, y)) == 1.8125
    # 1.75 * 1.5: 0.75 + 0.5 + 0.0625 = 1.3125 carries -> 1.3125 * 2^1
    x = _as_tensor([0x3F00], torch.float16)
    assert float(lmul(x, y)) == 2.625
    assert float(lmul(-x, y)) == -2.625
    # 1.96875^2: 0.96875 * 2 + 0.0625 = 2 carries twice -> 1.0 * 2^2
    x = _as_tensor([0x3FE0], torch.float16)
    assert float(lmul(x, x)) == 4.0


def test_offset_exponent_matches_the_paper() -> None:
    assert [offset_exponent(m) for m in range(1, 11)] == [1, 2, 3, 3, 4, 4, 4, 4, 4, 4]


@pytest.mark.parametrize("dtype", list(FORMATS))
def test_relative_error_bound(dtype: torch.dtype) -> None:
    """Normal operands: ``(4c - (1-c)^2) / (3-c)^2 <= L(x,y)/(xy) - 1 <= c``, c = 2^-l."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(200_000, generator=g) * 3).to(dtype)
    y = (torch.randn(200_000, generator=g) * 3).to(dtype)
    keep = (x.abs() >= torch.finfo(dtype).tiny) & (y.abs() >= torch.finfo(dtype).tiny)
    x, y = x[keep], y[keep]
    exact = x.double() * y.double()
    rel = lmul(x, y).double() / exact - 1
    c = 2.0 ** -offset_exponent(FORMATS[dtype][1])
    lo, hi = (4 * c - (1 - c) ** 2) / (3 - c) ** 2, c
    assert float(rel.min()) >= lo - 1e-12 and float(rel.max()) <= hi + 1e-12
    # the bound is tight: both ends are approached on this many samples
    assert float(rel.min()) < lo + 0.002 and float(rel.max()) > hi - 0.002
    # and L-Mul is not exact multiplication
    assert float(rel.abs().mean()) > 0.01


def test_rejects_other_dtypes() -> None:
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        lmul(torch.ones(2), torch.ones(2))
