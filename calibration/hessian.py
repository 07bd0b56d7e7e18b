"""Streaming accumulation of the layer Hessian ``H = 2 X^T X / n`` used by GPTQ.

For a linear layer ``y = x W^T`` and the layer-wise loss ``||W X^T - Q X^T||^2 / n``,
the Hessian with respect to each row of ``W`` is ``H = 2 X^T X / n`` (Frantar et al.,
"GPTQ", 2022, section 3). Calibration inputs arrive batch by batch with any leading
shape ``[..., K]``; each row (token) is one sample. We keep the raw sum ``X^T X`` and
the row count and only divide at the end, which is exact in real arithmetic and avoids
the repeated rescaling of the reference implementation. (That implementation counts
sequences rather than tokens in ``n``; the two differ by a constant factor, to which
GPTQ is invariant because its damping is relative to ``mean(diag H)``.)
"""

from __future__ import annotations

import torch


class OwnedHessian:
    """A finished Hessian handed over to its last reader, who may overwrite it.

    GPTQ factorises ``H + lambda I`` in a ``K x K`` work matrix; a reader that owns ``H``
    can use ``H``'s own storage for it instead of a second matrix (0.15 GB for a
    ``K = 6144`` down projection). :meth:`release` gives the tensor to the callee and
    drops this holder's reference, so the storage is freed when the callee is done.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor: torch.Tensor | None = tensor

    def release(self) -> torch.Tensor:
        """The tensor, once (the holder keeps no reference)."""
        if self._tensor is None:
            raise ValueError("OwnedHessian.release() called twice")
        tensor, self._tensor = self._tensor, None
        return tensor


class HessianAccumulator:
    """Accumulates ``sum_i x_i x_i^T`` over calibration rows of one layer input.

    Args:
        in_features: ``K``, the size of the last input dimension.
        dtype: Accumulation dtype (``torch.float64`` default, or ``torch.float32``).
        device: Where the ``[K, K]`` sum lives (defaults to the first batch's device).
    """

    def __init__(
        self,
        in_features: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        if in_features < 1:
            raise ValueError(f"HessianAccumulator in_features must be >= 1, got {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"HessianAccumulator dtype must be float32 or float64, got {dtype}")
        self.in_features = in_features
        self.dtype = dtype
        self._device = None if device is None else torch.device(device)
        self._sum: torch.Tensor | None = None
        self._count = 0

    @property
    def nsamples(self) -> int:
        """Number of rows (tokens) accumulated so far."""
        return self._count

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` [..., K] (every leading index is one sample)."""
        rows = self.rows(x)
        if rows is None:
            return
        part = rows.T @ rows
        check_diagonal(part.diagonal())
        if self._sum is None:
            self._sum = part
        else:
            self._sum += part
        self._count += rows.shape[0]

    def rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x`` [..., K] as ``[n, K]`` rows in the accumulation dtype on the sum's device
        (None when there are no rows).

        Raises:
            ValueError: The last dimension is not ``K``.
        """
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"HessianAccumulator expects inputs [..., {self.in_features}], "
                f"got shape {tuple(x.shape)}"
            )
        rows = x.detach().reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return None
        device = self._device if self._device is not None else rows.device
        if self._sum is not None:
            device = self._sum.device
        return rows.to(device=device, dtype=self.dtype)

    def merge(self, other: HessianAccumulator) -> None:
        """Add another accumulator's samples (e.g. from another data shard)."""
        if other.in_features != self.in_features:
            raise ValueError(
                f"cannot merge Hessians of {other.in_features} and {self.in_features} features"
            )
        if other._sum is None:
            return
        if self._sum is None:
            self._sum = torch.zeros_like(other._sum, dtype=self.dtype)
        self._sum += other._sum.to(device=self._sum.device, dtype=self.dtype)
        self._count += other._count

    def hessian(self) -> torch.Tensor:
        """``H = 2 X^T X / n`` [K, K] in the accumulation dtype.

        Raises:
            ValueError: No samples were accumulated.
        """
        if self._sum is None or self._count == 0:
            raise ValueError("HessianAccumulator has no samples; run calibration data first")
        return self._sum * (2.0 / self._count)


def check_diagonal(diagonal: torch.Tensor) -> None:
    """Refuse a partial ``X^T X`` whose diagonal is not finite.

    A NaN or Inf anywhere in ``X`` reaches the diagonal (``x^2``), so checking ``K``
    values replaces a pass over all ``N x K`` inputs (an overflowing ``x^2`` is refused
    as well).

    Raises:
        ValueError: A diagonal entry is NaN or Inf.
    """
    if not bool(torch.isfinite(diagonal).all()):
        raise ValueError("HessianAccumulator got NaN/Inf inputs; check the calibration data")
