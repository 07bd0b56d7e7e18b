"""AWQ's maths (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", MLSys 2024), as pure tensor functions.

**Scales** (section 3.2). A reader ``Y = X W^T`` of a producer's output can take a
per-input-channel scale ``s`` for free: ``Y = (X diag(s)^-1) (W diag(s))^T``, with
``X / s`` folded into the producer. Quantizing ``W diag(s)`` instead of ``W`` protects the
channels with large activations (their weights are scaled up before rounding, so their
relative rounding error shrinks by ``s``). AWQ searches

    s = s_X^alpha,   s_X = mean_tokens |X|   (per input channel)            (eq. 5)

over a grid of ``alpha`` in [0, 1), picking the ``alpha`` with the least block-local
output error ``|| f(X; W) - f(X; Q(W diag(s)) diag(s)^-1) ||^2`` where ``f`` is the
smallest module holding the readers (attention for q/k/v, the MLP for gate/up, the reader
itself for o_proj and down_proj). ``s`` is normalised so ``sqrt(max(s) min(s)) = 1``.
``alpha = 0`` is ``s = 1``, so the search never does worse than no scaling on its data.
With ``duo_scaling`` (what AutoAWQ and llm-compressor default to) the candidates are
``s_X^alpha / s_W^(1 - alpha)``, ``s_W`` the mean over rows of ``|W| / max |W|`` per block.

**Clipping** (the search the AWQ code runs after scaling). For every scale block ``B``
of a reader's weight and ratios ``r = 1, 1 - 1/n, ..., 1 - max_shrink``, clamp ``B`` to
``r`` times its range, quantize, and keep the ``r`` with the least squared partial output
error ``sum_tokens (X_B (Q(clip_r W)_B - W_B)^T)^2`` (``X_B`` the block's input columns).
Clamping changes the FP weight, and the scale rule then picks the clipped range.
"""

from __future__ import annotations

import torch

from ptq.formats import QuantFormat, fake_quantize
from ptq.formats.quantizer import expand_blocks, from_blocks, to_blocks
from ptq.passes.quant_with_scales import tensor_global_scale

EPS = 1e-4


def awq_scales(
    x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """``s = x_mean^alpha`` (or ``x_mean^alpha / w_mean^(1-alpha)``), normalised so that
    ``sqrt(max(s) * min(s)) = 1``; fp32, on ``x_mean``'s device."""
    s = x_mean.double().clamp(min=EPS).pow(alpha)
    if w_mean is not None:
        s = s / w_mean.double().clamp(min=EPS).pow(1.0 - alpha)
    s = s / (s.max() * s.min()).sqrt()
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.float()


def weight_magnitude(weights: list[torch.Tensor], fmt: QuantFormat) -> torch.Tensor:
    """``s_W``: per input channel, the mean over rows of ``|W| / max |W|`` within each scale
    block of ``fmt`` (rows of all ``weights`` stacked)."""
    w = torch.cat([t.float() for t in weights])
    block = fmt.granularity.block_shape(*w.shape)
    wb = to_blocks(w.abs(), block)
    peak = wb.amax(dim=(1, 3), keepdim=True).clamp(min=1e-12)
    return from_blocks(wb / peak, w.shape).mean(dim=0)


def scaled_fake_weight(w: torch.Tensor, s: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1``: the weight as a reader of the unscaled input sees it."""
    ws = w.float() * s[None, :]
    return (fake_quantize(ws, fmt) / s[None, :]).to(w.dtype)


def _clamp(w: torch.Tensor, fmt: QuantFormat, ratio: torch.Tensor) -> torch.Tensor:
    """``w`` clamped per scale block to ``ratio`` (``[R/r, C/c]``) times its range."""
    block = fmt.granularity.block_shape(*w.shape)
    wb = to_blocks(w, block)
    if fmt.symmetric:
        hi = wb.abs().amax(dim=(1, 3))
        lo = -hi
    else:
        hi = wb.amax(dim=(1, 3)).clamp(min=0.0)
        lo = wb.amin(dim=(1, 3)).clamp(max=0.0)
    top = expand_blocks(hi * ratio, block, w.shape)
    bottom = expand_blocks(lo * ratio, block, w.shape)
    return torch.maximum(torch.minimum(w, top), bottom)


def _block_errors(x: torch.Tensor, diff: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``sum_tokens (X_B D_B^T)^2`` per scale block ``[R/r, C/c]`` of ``diff`` [R, C]."""
    r, c = block
    rows, cols = diff.shape
    nb = -(-cols // c)
    pad = nb * c - cols
    xp = torch.nn.functional.pad(x, (0, pad)).reshape(x.shape[0], nb, c)
    dp = torch.nn.functional.pad(diff, (0, pad)).reshape(rows, nb, c)
    partial = torch.einsum("nbc,rbc->brn", xp, dp).pow(2).sum(dim=2)  # [nb, R]
    per_row = partial.T  # [R, nb]
    pad_r = (-rows) % r
    per_row = torch.nn.functional.pad(per_row, (0, 0, 0, pad_r))
    return per_row.reshape(-1, r, nb).sum(dim=1)


def clip_search(
    w: torch.Tensor,
    x: torch.Tensor,
    fmt: QuantFormat,
    grid: int = 20,
    max_shrink: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's clipping search on weight ``w`` [R, C] with input rows ``x`` [n, C].

    Returns:
        ``(clipped weight, chosen ratio per scale block [R/r, C/c])``. Ratio 1 (no
        clipping) is a candidate, so each block's partial output error never grows.
    """
    w = w.float()
    x = x.float()
    block = fmt.granularity.block_shape(*w.shape)
    shape = (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
    gs = tensor_global_scale(w, fmt)
    best_err = torch.full(shape, float("inf"), device=w.device)
    best = torch.ones(shape, device=w.device)
    for i in range(max(1, round(max_shrink * grid))):
        ratio = torch.full(shape, 1.0 - i / grid, device=w.device)
        cand = _clamp(w, fmt, ratio)
        q = fake_quantize(cand, fmt, global_scale=gs)
        err = _block_errors(x, q - w, block)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, ratio, best)
    return _clamp(w, fmt, best), best
