"""Every code of every <= 8-bit format: decode matches the oracle, encode inverts decode."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from ptq.formats import (
    FP4_E1M2,
    FP4_E2M1,
    FP4_E3M0,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E4M3FNUZ,
    FP8_E5M2,
    FP8_E5M2FNUZ,
    FloatFormat,
    IntFormat,
)
from ptq.formats.minifloat import decode_float, decode_table, encode_float
from ptq.formats.scales import UE5M3

# (our format, numpy oracle dtype). ml_dtypes covers the OCP/MX, FNUZ and IEEE-like grids.
ML_DTYPES = [
    (FP8_E4M3, ml_dtypes.float8_e4m3fn),
    (FP8_E4M3FNUZ, ml_dtypes.float8_e4m3fnuz),
    (FP8_E5M2, ml_dtypes.float8_e5m2),
    (FP8_E5M2FNUZ, ml_dtypes.float8_e5m2fnuz),
    (FloatFormat(4, 3, 7, "ieee"), ml_dtypes.float8_e4m3),
    (FloatFormat(3, 4, 3, "ieee"), ml_dtypes.float8_e3m4),
    (FloatFormat(4, 3, 11, "fnuz"), ml_dtypes.float8_e4m3b11fnuz),
    (FP6_E2M3, ml_dtypes.float6_e2m3fn),
    (FP6_E3M2, ml_dtypes.float6_e3m2fn),
    (FP4_E2M1, ml_dtypes.float4_e2m1fn),
]
TORCH_DTYPES = [
    (FP8_E4M3, torch.float8_e4m3fn),
    (FP8_E4M3FNUZ, torch.float8_e4m3fnuz),
    (FP8_E5M2, torch.float8_e5m2),
    (FP8_E5M2FNUZ, torch.float8_e5m2fnuz),
]
ALL_FLOATS = [f for f, _ in ML_DTYPES] + [FP4_E3M0, FP4_E1M2, UE5M3, FloatFormat(3, 0, 3, "fn")]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as values, NaN equal to NaN, and the sign of zero equal."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return False
    a, b = a[~nan_a], b[~nan_b]
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


@pytest.mark.parametrize(("fmt", "np_dtype"), ML_DTYPES, ids=lambda v: getattr(v, "name", ""))
def test_decode_matches_ml_dtypes(fmt: FloatFormat, np_dtype: type) -> None:
    codes = np.arange(2**fmt.bits, dtype=np.uint8)
    oracle = torch.from_numpy(codes.view(np_dtype).astype(np.float32))
    ours = decode_float(torch.from_numpy(codes), fmt)
    assert _same(ours, oracle)
    finite = oracle[torch.isfinite(oracle)]
    assert float(finite.max()) == fmt.max_value
    assert float(finite[finite > 0].min()) == fmt.min_subnormal


@pytest.mark.parametrize(("fmt", "dtype"), TORCH_DTYPES, ids=lambda v: getattr(v, "name", ""))
def test_decode_matches_torch_float8(fmt: FloatFormat, dtype: torch.dtype) -> None:
    codes = torch.arange(256, dtype=torch.uint8)
    assert _same(decode_float(codes, fmt), codes.view(dtype).float())


@pytest.mark.parametrize("fmt", ALL_FLOATS, ids=lambda f: f.name)
def test_encode_inverts_decode_on_every_code(fmt: FloatFormat) -> None:
    codes = torch.arange(2**fmt.bits, dtype=torch.uint8)
    values = decode_float(codes, fmt)
    back = encode_float(values, fmt)
    keep = ~torch.isnan(values)
    if fmt.inf_nan == "fnuz":
        keep &= codes != 0x80
    assert torch.equal(back[keep], codes[keep])
    if fmt.has_nan:
        assert torch.isnan(decode_float(encode_float(values[~keep], fmt), fmt)).all()


def test_e3m0_and_e1m2_grids() -> None:
    # E3M0 bias 3: 0 and powers of two 2^-2 .. 2^4 (codes 0b0eee).
    assert decode_table(FP4_E3M0)[:8] == (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    # E1M2 bias 1: fixed point in quarters 0 .. 1.75 (codes 0b0emm).
    assert decode_table(FP4_E1M2)[:8] == (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    # E3M0 "fn": S.111 is NaN so the largest finite is 2^(6-3) = 8.
    fn = FloatFormat(3, 0, 3, "fn")
    assert fn.max_value == 8.0 and math.isnan(decode_table(fn)[7])


def test_e2m1_table_golden() -> None:
    # code 0b0111 = 6.0, 0b1001 = -0.5, 0b1000 = -0.0
    table = decode_table(FP4_E2M1)
    assert table[:8] == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    assert table[0b1001] == -0.5 and math.copysign(1.0, table[0b1000]) == -1.0


def test_ue5m3_documented_choice() -> None:
    # bias 15, no Inf, 0xFF = NaN, subnormals: 0x01 = 2^-14 * 1/8, 0xFE = 2^16 * 1.75.
    table = decode_table(UE5M3)
    assert table[0x01] == 2.0**-17 and table[0x08] == 2.0**-14
    assert table[0xFE] == 114688.0 and math.isnan(table[0xFF])
    assert UE5M3.max_value == 114688.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exp_bits": 5, "man_bits": 3}, "<= 8 bits"),
        ({"exp_bits": 0, "man_bits": 3}, "<= 8 bits"),
        ({"exp_bits": 4, "man_bits": 3, "bias": 300}, "bias"),
        ({"exp_bits": 4, "man_bits": 3, "inf_nan": "odd"}, "inf_nan"),
        ({"exp_bits": 4, "man_bits": 3, "inf_nan": "fnuz", "signed": False}, "sign bit"),
    ],
)
def test_float_format_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FloatFormat(**kwargs)  # type: ignore[arg-type]


def test_int_ranges() -> None:
    assert (IntFormat(4).qmin, IntFormat(4).qmax) == (-8, 7)
    assert (IntFormat(4, restricted=True).qmin, IntFormat(2, signed=False).qmax) == (-7, 3)
    with pytest.raises(ValueError, match="bits"):
        IntFormat(0)
    with pytest.raises(ValueError, match="restricted"):
        IntFormat(4, signed=False, restricted=True)
