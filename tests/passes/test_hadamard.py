"""Hadamard constructions (Sylvester, Paley I/II, Kronecker) and the fast transform."""

from __future__ import annotations

import pytest
import torch

from ptq.passes.hadamard import (
    factorize,
    fwht,
    hadamard_matrix,
    hadamard_transform,
    paley1,
    paley2,
    random_hadamard,
    sylvester,
)


def _is_hadamard(h: torch.Tensor) -> bool:
    n = h.shape[0]
    entries_ok = bool(((h == 1) | (h == -1)).all())
    return entries_ok and torch.equal(h @ h.T, n * torch.eye(n))


def test_paley1_order_12() -> None:
    h = paley1(11)
    assert h.shape == (12, 12)
    assert _is_hadamard(h)


def test_paley2_order_36() -> None:
    h = paley2(17)
    assert h.shape == (36, 36)
    assert _is_hadamard(h)


@pytest.mark.parametrize("q", [3, 7, 19, 23])
def test_paley1_other_orders(q: int) -> None:
    assert _is_hadamard(paley1(q))


@pytest.mark.parametrize("q", [5, 13])
def test_paley2_other_orders(q: int) -> None:
    assert _is_hadamard(paley2(q))


def test_paley_rejects_wrong_primes() -> None:
    with pytest.raises(ValueError, match="Paley I"):
        paley1(13)
    with pytest.raises(ValueError, match="Paley II"):
        paley2(11)
    with pytest.raises(ValueError, match="Paley I"):
        paley1(15)


@pytest.mark.parametrize(
    ("n", "m"), [(576, 36), (1536, 12), (64, 1), (192, 12), (40, 20), (28, 28)]
)
def test_factorize_and_orthogonality(n: int, m: int) -> None:
    h, p = factorize(n)
    assert h.shape[0] == m and h.shape[0] * p == n
    q = hadamard_matrix(n)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=q.dtype), atol=1e-12)


def test_factorize_impossible_order() -> None:
    with pytest.raises(ValueError, match="no Hadamard matrix of order 92"):
        factorize(92)


def test_fwht_matches_sylvester() -> None:
    x = torch.randn(5, 32, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ sylvester(32).double().T, atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(3, 12))


@pytest.mark.parametrize("n", [576, 1536, 64, 192])
def test_fast_transform_matches_dense(n: int) -> None:
    x = torch.randn(2, 3, n, dtype=torch.float64)
    dense = x @ hadamard_matrix(n).T
    assert torch.allclose(hadamard_transform(x), dense, atol=1e-10)
    # orthogonal: norms preserved
    assert torch.allclose(hadamard_transform(x).norm(dim=-1), x.norm(dim=-1))


def test_random_hadamard_seeded_and_orthogonal() -> None:
    a = random_hadamard(576, torch.Generator().manual_seed(1))
    b = random_hadamard(576, torch.Generator().manual_seed(1))
    c = random_hadamard(576, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a @ a.T, torch.eye(576, dtype=a.dtype), atol=1e-12)
