"""OrderedHessian: the left fold over forwards, each partial folded in row slabs."""

from __future__ import annotations

import pytest
import torch

from ptq.calibration.hessian import OwnedHessian
from ptq.calibration.ordered_hessian import SLAB_ROWS, OrderedHessian


@pytest.mark.parametrize("k", [SLAB_ROWS - 3, SLAB_ROWS, 2 * SLAB_ROWS + 77])
def test_slab_fold_is_the_fold_of_whole_partials(k: int) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 96, k, generator=g) * (i + 1) for i in range(3)]
    acc = OrderedHessian(k)
    total = torch.zeros(k, k)
    for x in batches:
        acc.update(x)
        rows = x.reshape(-1, k)
        total += rows.T @ rows  # one K x K partial per forward, then the fold
    assert acc.nsamples == 3 * 2 * 96
    assert torch.equal(acc.hessian(), total * (2.0 / acc.nsamples))


def test_deferred_partials_continue_the_same_fold() -> None:
    g = torch.Generator().manual_seed(1)
    first, second = torch.randn(40, 600, generator=g), torch.randn(40, 600, generator=g)
    whole = OrderedHessian(600)
    whole.update(first)
    whole.update(second)
    head = OrderedHessian(600)
    head.update(first)
    tail = OrderedHessian(600, defer=True)
    tail.update(second)
    assert head._sum is not None
    tail.continue_from(head._sum.clone(), head.nsamples)
    assert torch.equal(tail.hessian(), whole.hessian())


def test_non_finite_rows_are_refused() -> None:
    x = torch.randn(8, SLAB_ROWS + 5)
    x[3, SLAB_ROWS + 2] = float("nan")  # in the second slab
    with pytest.raises(ValueError, match="NaN/Inf"):
        OrderedHessian(SLAB_ROWS + 5).update(x)


def test_the_last_reader_gets_the_hessian_handed_over() -> None:
    acc = OrderedHessian(16)
    acc.update(torch.randn(40, 16, generator=torch.Generator().manual_seed(2)))
    acc.add_reader()
    acc.add_reader()  # q, k and v read one matrix
    first, second = acc.take(), acc.take()
    assert isinstance(first, torch.Tensor) and first is second  # shared, read-only
    last = acc.take()
    assert isinstance(last, OwnedHessian)
    h = last.release()
    assert h is first  # the same matrix, now the last reader's
    with pytest.raises(ValueError, match="handed"):
        acc.hessian()
