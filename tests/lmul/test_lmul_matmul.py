"""The chunked L-Mul matmul: the sum of the elementwise L-Mul products, in float32."""

from __future__ import annotations

import pytest
import torch

from ptq.lmul import lmul, lmul_linear

U32 = 2.0**-24  # float32 unit roundoff


def _operands(dtype: torch.dtype, rows: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) * 2).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.1).to(dtype)
    x[torch.rand(rows, k, generator=g) < 0.05] = 0  # zeros in both operands
    w[torch.rand(n, k, generator=g) < 0.1] = 0
    b = torch.randn(n, generator=g).to(dtype)
    return x, w, b


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """|got - exact sum| within float32 accumulation error (+ the final rounding)."""
    products = lmul(x[:, None, :], w[None, :, :]).double()  # [rows, n, k], exact float32 values
    exact = products.sum(-1) + (0 if b is None else b.double())
    k = x.shape[-1]
    gamma = k * U32 / (1 - k * U32)
    bound = gamma * (products.abs().sum(-1) + (0 if b is None else b.double().abs()))
    out_ulp = torch.finfo(got.dtype).eps * exact.abs()  # rounding the result to x's dtype
    err = (got.double() - exact).abs()
    assert bool((err <= bound + out_ulp).all()), float((err - bound - out_ulp).max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("budget", [1 << 18, 97])  # one block, and many ragged blocks
def test_matmul_is_the_float32_sum_of_lmul_products(dtype: torch.dtype, budget: int) -> None:
    x, w, b = _operands(dtype, rows=9, k=70, n=13, seed=0)
    _check(lmul_linear(x, w, b, budget=budget), x, w, b)
    _check(lmul_linear(x, w, None, budget=budget), x, w, None)


def test_extreme_bf16_exponents_take_the_exact_path() -> None:
    x, w, _ = _operands(torch.bfloat16, rows=5, k=40, n=7, seed=1)
    x[0, 0] = 2.0**100  # 2^100 * w overflows float32 for |w| >= 2^28: not here, but
    w[0, 0] = 2.0**30  # 2^100 * 2^30 does: inf, exactly as the elementwise definition
    x[1, 1] = 2.0**-120
    w[1, 1] = 2.0**-20  # underflows to 0
    got = lmul_linear(x, w)
    assert torch.isinf(got[0, 0])
    _check(got[1:], x[1:], w, None)


def test_nan_and_inf_operands_propagate() -> None:
    x, w, _ = _operands(torch.float16, rows=3, k=8, n=4, seed=2)
    x[0, 3] = float("inf")
    w[:, 3] = 0  # inf * 0 -> NaN in row 0
    x[1, 2] = float("nan")
    got = lmul_linear(x, w)
    assert bool(got[0].isnan().all()) and bool(got[1].isnan().all())
    _check(got[2:], x[2:], w, None)


def test_leading_dimensions_and_dtype_are_kept() -> None:
    x, w, b = _operands(torch.bfloat16, rows=6, k=16, n=5, seed=3)
    got = lmul_linear(x.view(2, 3, 16), w, b)
    assert got.shape == (2, 3, 5) and got.dtype == torch.bfloat16
    assert torch.equal(got.view(6, 5), lmul_linear(x, w, b))


def test_lmul_is_not_exact_multiplication() -> None:
    x, w, _ = _operands(torch.bfloat16, rows=8, k=64, n=8, seed=4)
    exact = x.float() @ w.float().T
    rel = (lmul_linear(x, w).float() - exact).norm() / exact.norm()
    assert 1e-3 < float(rel) < 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wrapping_add_path_equals_the_exact_path_bit_for_bit(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ptq.lmul.matmul as mm

    x, w, b = _operands(dtype, rows=7, k=50, n=11, seed=5)
    x[x == 0] = 1.5  # no zero activations: both paths then sum each block with .sum()
    fast = lmul_linear(x, w, b, budget=200)
    real = mm._fast_path_ok
    assert real(x, w, mm.field_layout(dtype))[0]
    monkeypatch.setattr(mm, "_fast_path_ok", lambda *a: (False, *real(*a)[1:]))
    assert torch.equal(fast, lmul_linear(x, w, b, budget=200))
