"""Granularity: which elements share one scale.

Every granularity lowers to one rule, a *block shape* over a 2-D ``[rows, cols]`` tensor
(the view torchao uses): per tensor is the whole matrix, per channel is ``(1, cols)``,
per group is ``(1, group)`` along the reduction axis, a 2-D block is ``(r, c)``.
Scales then have shape ``[ceil(rows / r), ceil(cols / c)]``, the compressed-tensors
layout for every strategy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def block_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return rows, cols

    @property
    def name(self) -> str:
        return "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (axis 0 of a ``[out, in]`` weight) or per input column."""

    axis: int = 0

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, -1, -2):
            raise ValueError(f"PerChannel axis must address a 2-D tensor, got {self.axis}")

    def block_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return (1, cols) if self.axis in (0, -2) else (rows, 1)

    @property
    def name(self) -> str:
        return "channel"


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive elements along the reduction (last) axis."""

    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"group size must be positive, got {self.size}")

    def block_shape(self, rows: int, cols: int) -> tuple[int, int]:
        if cols % self.size:
            raise ValueError(
                f"group size {self.size} does not divide the reduction size {cols}; "
                f"choose a group size that divides it (e.g. {largest_pow2_divisor(cols)})"
            )
        return 1, self.size

    @property
    def name(self) -> str:
        return "group"


@dataclass(frozen=True)
class PerBlock:
    """One scale per 2-D ``rows x cols`` tile (e.g. 128x128 for DeepSeek-style FP8).

    Edge tiles may be partial: scales have shape ``[ceil(R / rows), ceil(C / cols)]``.
    """

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"block shape must be positive, got {self.rows}x{self.cols}")

    def block_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def name(self) -> str:
        return "block"


Granularity = PerTensor | PerChannel | PerGroup | PerBlock


def largest_pow2_divisor(n: int, ceiling: int | None = None) -> int:
    """Largest power of two that divides ``n`` (and is at most ``ceiling``)."""
    p = n & -n
    if ceiling is not None:
        while p > ceiling:
            p //= 2
    return p
