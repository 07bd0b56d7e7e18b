"""Rounding onto grids: nearest-even, saturation, subnormals, -0, stochastic, NaN policy."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptq.formats import (
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    FP8_E4M3FNUZ,
    FP8_E5M2,
    INT4,
    FloatFormat,
    PerChannel,
    PerGroup,
    QuantFormat,
    dequantize,
    fake_quantize,
    quantize,
)
from ptq.formats.minifloat import round_finite, round_to_float_grid

ORACLES = [
    (FP8_E4M3, ml_dtypes.float8_e4m3fn),
    (FP8_E4M3FNUZ, ml_dtypes.float8_e4m3fnuz),
    (FP8_E5M2, ml_dtypes.float8_e5m2),
    (FP6_E2M3, ml_dtypes.float6_e2m3fn),
    (FP6_E3M2, ml_dtypes.float6_e3m2fn),
    (FP4_E2M1, ml_dtypes.float4_e2m1fn),
    (FloatFormat(3, 4, 3, "ieee"), ml_dtypes.float8_e3m4),
]

floats = st.lists(
    st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, width=32), min_size=1, max_size=64
)


def _oracle(x: torch.Tensor, np_dtype: type) -> torch.Tensor:
    return torch.from_numpy(x.numpy().astype(np_dtype).astype(np.float32))


@pytest.mark.parametrize(("fmt", "np_dtype"), ORACLES, ids=lambda v: getattr(v, "name", ""))
@settings(max_examples=40, deadline=None)
@given(values=floats, log_scale=st.integers(min_value=-12, max_value=12))
def test_nearest_even_matches_ml_dtypes(
    fmt: FloatFormat, np_dtype: type, values: list[float], log_scale: int
) -> None:
    x = (torch.tensor(values) * 2.0**log_scale).clamp(-fmt.max_value, fmt.max_value)
    for native in (True, False):
        ours = round_finite(x, fmt, native=native)
        assert torch.equal(ours, _oracle(x, np_dtype))
        assert torch.equal(torch.signbit(ours), torch.signbit(_oracle(x, np_dtype)))


def test_generic_path_matches_torch_cast_on_a_dense_sweep() -> None:
    x = torch.linspace(-448.0, 448.0, 200_001)
    x = torch.cat([x, x * 2.0**-8, x * 2.0**-12])
    ours = round_finite(x, FP8_E4M3, native=False)
    assert torch.equal(ours, x.to(torch.float8_e4m3fn).float())


def test_ties_go_to_even() -> None:
    # FP4 E2M1 grid ... 2, 3, 4, 6: 2.5 -> 2 (mantissa 0), 3.5 -> 4, 5 -> 4, 0.25 -> 0,
    # 0.75 -> 1 (0.5 has odd mantissa 1), 1.25 -> 1, 1.75 -> 2.
    x = torch.tensor([2.5, 3.5, 5.0, 0.25, 0.75, 1.25, 1.75, -2.5])
    expected = torch.tensor([2.0, 4.0, 4.0, 0.0, 1.0, 1.0, 2.0, -2.0])
    for native in (True, False):
        assert torch.equal(round_finite(x, FP4_E2M1, native=native), expected)
    # E4M3 subnormals: step 2^-9; 1.5 * 2^-9 -> 2 * 2^-9, 2.5 * 2^-9 -> 2 * 2^-9.
    sub = torch.tensor([1.5, 2.5, 0.5]) * 2.0**-9
    assert torch.equal(
        round_finite(sub, FP8_E4M3, native=False), torch.tensor([2.0, 2.0, 0.0]) * 2.0**-9
    )


@pytest.mark.parametrize("fmt", [FP8_E4M3, FP8_E5M2, FP6_E2M3, FP6_E3M2, FP4_E2M1])
def test_saturates_never_overflows(fmt: FloatFormat) -> None:
    x = torch.tensor([1e30, -1e30, fmt.max_value * 1.5, 3.0e38])
    for native in (True, False):
        q = round_finite(x, fmt, native=native)
        assert torch.equal(q.abs(), torch.full_like(q, fmt.max_value))
        assert torch.isfinite(q).all()


def test_negative_zero() -> None:
    x = torch.tensor([-0.0, -1e-30, -0.2])
    q = round_finite(x, FP4_E2M1, native=False)
    assert torch.equal(q, torch.zeros(3)) and torch.signbit(q).all()
    x = x[:2]
    # FNUZ has no -0: it becomes +0 (code 0x00, not the NaN 0x80).
    q = round_finite(x, FP8_E4M3FNUZ)
    assert not torch.signbit(q).any()


def test_nonfinite_is_never_a_number() -> None:
    x = torch.tensor([math.nan, math.inf, -math.inf, 1.0])
    e5 = round_to_float_grid(x, FP8_E5M2)
    assert math.isnan(e5[0]) and e5[1] == math.inf and e5[2] == -math.inf
    e4 = round_to_float_grid(x, FP8_E4M3)
    assert torch.isnan(e4[:3]).all() and e4[3] == 1.0
    with pytest.raises(ValueError, match="no NaN"):
        round_to_float_grid(x, FP4_E2M1)


def test_nonfinite_policy_in_quantize() -> None:
    x = torch.randn(4, 64)
    x[1, 3] = math.nan
    x[2, 5] = math.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize(x, QuantFormat(FP8_E4M3, PerChannel()))
    fmt = QuantFormat(FP8_E5M2, PerGroup(32), nonfinite="propagate")
    y = dequantize(quantize(x, fmt))
    assert math.isnan(y[1, 3]) and y[2, 5] == math.inf
    finite = torch.isfinite(x)
    assert torch.isfinite(y[finite]).all()
    assert torch.equal(fake_quantize(x, fmt).nan_to_num(7.0), y.nan_to_num(7.0))
    with pytest.raises(ValueError, match="NaN code"):
        QuantFormat(INT4, PerGroup(32), nonfinite="propagate")


@pytest.mark.parametrize("fmt", [FP4_E2M1, FP6_E3M2, FP8_E4M3])
def test_stochastic_rounding_is_unbiased_and_seeded(fmt: FloatFormat) -> None:
    x = torch.tensor([0.3, 1.1, 2.6, -4.7, 0.07, -0.9]).repeat(20_000, 1)
    x = x.clamp(-fmt.max_value, fmt.max_value)
    g1 = torch.Generator().manual_seed(1234)
    q1 = round_finite(x, fmt, "stochastic", g1)
    g2 = torch.Generator().manual_seed(1234)
    assert torch.equal(q1, round_finite(x, fmt, "stochastic", g2))
    assert torch.equal(round_finite(q1, fmt, native=False), q1)  # on the grid
    for col in range(x.shape[1]):
        seen = torch.unique(q1[:, col])
        assert len(seen) <= 2 and seen.min() <= x[0, col] <= seen.max()  # the two neighbours
        gap = float(seen.max() - seen.min())
        # mean error -> 0: 6 sigma bound, sigma <= gap / 2 / sqrt(n)
        assert (
            abs(float(q1[:, col].mean()) - float(x[0, col]))
            <= 6 * gap / 2 / math.sqrt(20_000) + 1e-7
        )


@settings(max_examples=25, deadline=None)
@given(values=floats)
def test_int_stochastic_rounding_neighbours(values: list[float]) -> None:
    x = torch.tensor(values).reshape(1, -1) * 7
    fmt = QuantFormat(INT4, PerChannel())
    g = torch.Generator().manual_seed(0)
    q = quantize(x, fmt, rounding="stochastic", generator=g)
    y = x / q.scale
    assert ((q.codes.float() - y).abs() < 1.0 + 1e-6).all()


def test_all_finite_checks_every_slice() -> None:
    from ptq.formats.rounding import FINITE_CHECK_ELEMENTS, all_finite

    rows = 2 * FINITE_CHECK_ELEMENTS // 64 + 3  # three slices of 64-wide rows
    x = torch.zeros(rows, 64)
    assert all_finite(x) and all_finite(x.T) and all_finite(torch.tensor(1.0))
    x[-1, -1] = float("inf")  # in the last slice only
    assert not all_finite(x) and not all_finite(x.T)
    assert not all_finite(torch.tensor(float("nan")))
