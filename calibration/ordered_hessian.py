"""A layer Hessian summed in a fixed order, so sharding the batches cannot change its bits.

GPTQ's Hessian ``H = 2 X^T X / n`` (Frantar et al., "GPTQ", 2022, section 3) is a sum
over calibration forwards ``b = 0..B-1`` of the partials ``P_b = X_b^T X_b`` (each one
product in float32, the speed of the activations' own dtype, and so is the sum: Hessians
are float32 on every device, half the memory of float64, which for a ``K = 14336`` down
projection is 0.8 GB instead of 1.6).
Floating-point addition is not associative, so the sum is *defined* here as the left
fold ``S = (((0 + P_0) + P_1) + ...) + P_{B-1}``, each ``P_b`` computed on its own
(never accumulated inside the matrix product). One process folds each partial as it
arrives; a rank of a data-parallel job holding batches ``[a, c)`` keeps its partials
(``defer``) until it receives ``S_{a-1}`` from the rank before it, then continues the
same fold (:func:`ptq.calibration.distributed.chain_reduce`). Either way the additions
happen in the same order, so 1, 2 or N processes give the same bits.
"""

from __future__ import annotations

import torch

from ptq.calibration.hessian import HessianAccumulator, OwnedHessian, check_diagonal

SLAB_ROWS = 512
"""Rows of a partial ``X^T X`` computed and folded at a time (a 512 x K slab)."""


class OrderedHessian(HessianAccumulator):
    """``sum_b X_b^T X_b`` as a left fold over forwards, in float32.

    Args:
        in_features: ``K``, the size of the last input dimension.
        defer: Keep the partials until :meth:`continue_from` gives the running sum of
            the batches before this shard (data-parallel ranks); ``hessian()`` refuses
            until then.
    """

    def __init__(self, in_features: int, *, defer: bool = False) -> None:
        super().__init__(in_features, dtype=torch.float32)
        self.defer = defer
        self.pending: list[tuple[torch.Tensor, int]] = []
        self._final: torch.Tensor | None = None
        self.readers = 1
        self._handed_over = False

    def add_reader(self) -> None:
        """One more layer reads this Hessian (fed the same input, e.g. k and v beside q)."""
        self.readers += 1

    def update(self, x: torch.Tensor) -> None:
        """Compute ``P_b = X_b^T X_b`` for one forward's rows and fold (or keep) it.

        The product and the fold run in float32 (relative rounding error ~1e-7 per
        addition: a few hundred forwards stay far below the 1 % damping GPTQ adds).
        Folded at once, ``P_b`` is computed and added ``SLAB_ROWS`` rows at a time
        (``P_b[j:j+s] = X_b[:, j:j+s]^T X_b``: each element is the same dot product over
        the rows of ``X_b`` as in one ``K x K`` product, bit-identical on this CPU's BLAS,
        see the tests), so the sum needs no second ``K x K`` matrix beside it.
        """
        if self._final is not None:
            raise ValueError("OrderedHessian.update() after hessian() finished the sum")
        if self.defer:
            part = HessianAccumulator(self.in_features, dtype=torch.float32)
            part.update(x)  # validates shape and finiteness
            if part._sum is not None:
                self.pending.append((part._sum, part.nsamples))
            return
        rows = self.rows(x)
        if rows is None:
            return
        k = self.in_features
        if self._sum is None:
            self._sum = torch.zeros(k, k, dtype=torch.float32, device=rows.device)
        for j in range(0, k, SLAB_ROWS):
            j2 = min(j + SLAB_ROWS, k)
            slab = rows[:, j:j2].T @ rows
            check_diagonal(slab[:, j:j2].diagonal())
            self._sum[j:j2] += slab
        self._count += rows.shape[0]

    def _fold(self, partial: torch.Tensor, rows: int) -> None:
        if self._sum is None:
            self._sum = torch.zeros_like(partial)
        self._sum += partial
        self._count += rows

    def continue_from(self, total: torch.Tensor, count: int) -> None:
        """Set the running sum to ``total`` (``count`` rows) and fold the kept partials."""
        self._sum, self._count, self.defer = total, count, False
        pending, self.pending = self.pending, []
        for partial, rows in pending:
            self._fold(partial.to(total.device), rows)

    def merge(self, other: HessianAccumulator) -> None:
        raise TypeError("OrderedHessian sums in batch order; use continue_from, not merge")

    def hessian(self) -> torch.Tensor:
        """``H = 2 X^T X / n``, scaled in place: the accumulator is finished and shares the
        one ``K x K`` matrix with every caller (layers fed the same input, e.g. q/k/v).
        Callers must not modify it."""
        if self.defer:
            raise ValueError(
                "OrderedHessian.hessian() on a shard before the reduction gave it the sums "
                "of the earlier batches"
            )
        if self._handed_over:
            raise ValueError(
                "OrderedHessian.hessian() after take() handed the matrix to its last reader"
            )
        if self._final is None:
            if self._sum is None or self._count == 0:
                raise ValueError("OrderedHessian has no samples; run calibration data first")
            self._final, self._sum = self._sum.mul_(2.0 / self._count), None
        return self._final

    def take(self) -> torch.Tensor | OwnedHessian:
        """``H`` for one reader that will not ask again: the shared matrix (read-only)
        while other readers remain, and for the last reader the matrix itself, handed
        over (:class:`OwnedHessian`): the accumulator lets go of it, so that reader may
        factorise in its storage and free it."""
        h = self.hessian()
        self.readers -= 1
        if self.readers > 0:
            return h
        self._final, self._handed_over = None, True
        return OwnedHessian(h)
