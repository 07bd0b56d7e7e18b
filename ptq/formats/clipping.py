"""MSE-optimal clipping: per block, the clipped range with least squared error.

For each block ``B`` and ratios ``r_i = 1 - (1 - r_min) * i / (n - 1)`` (``r_0 = 1``,
no clipping), quantize ``B`` with ``amax_i = r_i * amax(B)`` and keep the ``amax_i``
with the smallest ``||Q(B) - B||^2`` (the grid search of Banner et al., "Post-training
4-bit quantization of convolution networks", 2019, and AWQ/GPTQ-style clip search).
Since ``r_0 = 1`` is a candidate, the result is never worse than plain amax scaling.
"""

from __future__ import annotations

import torch

from ptq.formats.element import FloatFormat
from ptq.formats.minifloat import round_finite
from ptq.formats.qformat import QuantFormat
from ptq.formats.scale_rules import symmetric_scales


def _grid_round(y: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    el = fmt.element
    if isinstance(el, FloatFormat):
        return round_finite(y, el)
    return torch.clamp(torch.round(y), el.qmin, el.qmax)


def mse_clipped_amax(
    xb: torch.Tensor,
    fmt: QuantFormat,
    amax: torch.Tensor,
    gs: torch.Tensor | None,
    grid: int = 20,
    min_ratio: float = 0.5,
) -> torch.Tensor:
    """Per block of ``xb`` [R/r, r, C/c, c], the clipped ``amax`` with least squared error.

    Args:
        xb: Blocked finite fp32 input.
        fmt: Symmetric format (its scale rule and encoding are applied to each candidate).
        amax: Per-block ``amax(|B|)``, shape ``[R/r, C/c]`` (for the ``full_range`` rule
            the signed peak ``v*``; candidates ``r_i v*`` keep its sign).
        gs: NVFP4 global scale, if any.
        grid: Number of candidate ratios.
        min_ratio: Smallest ratio tried.
    """
    if grid < 1 or not 0.0 < min_ratio <= 1.0:
        raise ValueError(
            f"clip search needs grid >= 1 and 0 < min_ratio <= 1, got {grid}, {min_ratio}"
        )
    best_err = torch.full_like(amax, float("inf"))
    best = amax.clone()
    for i in range(grid):
        ratio = 1.0 - (1.0 - min_ratio) * i / max(grid - 1, 1)
        cand = amax * ratio
        _, eff, _ = symmetric_scales(cand, fmt, gs)
        s4 = eff[:, None, :, None]
        err = (_grid_round(xb / s4, fmt) * s4 - xb).pow(2).sum(dim=(1, 3))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand, best)
    return best
