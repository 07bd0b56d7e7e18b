"""HessianAccumulator: streaming 2 X^T X / n over batches of any leading shape."""

from __future__ import annotations

import pytest
import torch

from ptq.calibration.hessian import HessianAccumulator


def test_streaming_matches_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 7, 12, generator=g), torch.randn(5, 12, generator=g)]
    chunks.append(torch.randn(3, 1, 4, 12, generator=g))
    acc = HessianAccumulator(12)
    for c in chunks:
        acc.update(c)
    x = torch.cat([c.reshape(-1, 12) for c in chunks]).double()
    assert acc.nsamples == 14 + 5 + 12
    h = acc.hessian()
    assert h.dtype == torch.float64
    assert torch.allclose(h, 2.0 * x.T @ x / x.shape[0], rtol=1e-12, atol=1e-12)


def test_float32_accumulation_close_to_float64() -> None:
    x = torch.randn(64, 16)
    a32 = HessianAccumulator(16, dtype=torch.float32)
    a64 = HessianAccumulator(16)
    for part in x.split(10):
        a32.update(part)
        a64.update(part)
    assert a32.hessian().dtype == torch.float32
    assert torch.allclose(a32.hessian().double(), a64.hessian(), rtol=1e-5, atol=1e-5)


def test_merge_equals_single_pass() -> None:
    x = torch.randn(40, 8)
    whole, left, right = HessianAccumulator(8), HessianAccumulator(8), HessianAccumulator(8)
    whole.update(x)
    left.update(x[:15])
    right.update(x[15:])
    left.merge(right)
    assert left.nsamples == 40
    assert torch.allclose(left.hessian(), whole.hessian(), rtol=1e-12)


def test_bad_inputs_are_rejected() -> None:
    acc = HessianAccumulator(8)
    with pytest.raises(ValueError, match="no samples"):
        acc.hessian()
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        acc.update(torch.randn(4, 9))
    bad = torch.randn(4, 8)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        acc.update(bad)
    with pytest.raises(ValueError, match="dtype"):
        HessianAccumulator(8, dtype=torch.float16)
    with pytest.raises(ValueError, match="merge"):
        acc.merge(HessianAccumulator(4))
