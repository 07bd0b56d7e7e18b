"""Perplexity on held-out text: non-overlapping windows, ``ppl = exp(mean NLL)``.

This is the GPTQ/AWQ protocol (docs/invariants.md, "Evaluation protocol") with a shorter default window
(512 tokens) and a token budget so that evaluation fits a 2-core CPU.

Windows may be evaluated several at a time (``batch_size``): ``B`` consecutive windows
are stacked into one ``[B, seqlen]`` input, so every matmul of the forward pass sees
``B * seqlen`` rows instead of ``seqlen``. The tokens and each token's context are the
same whatever ``B``; only the shapes of the computation change (which is what batch
invariance, see :mod:`ptq.reproducibility`, is about).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.errors import PtqInputError


def tokenize_eval_text(tokenizer: Any, path: Path, max_tokens: int) -> torch.Tensor:
    """Token ids of ``path`` truncated to ``max_tokens`` (reads only what it needs)."""
    if not path.is_file():
        raise PtqInputError(f"evaluation text {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise PtqInputError(f"evaluation text {path} is empty")
    # ~6 characters per token is an upper bound for English BPE; tokenize only a prefix.
    ids = tokenizer(text[: max_tokens * 8], return_tensors="pt", add_special_tokens=False)[
        "input_ids"
    ][0]
    return ids[:max_tokens]


def _windows(ids: torch.Tensor, seqlen: int, batch_size: int) -> torch.Tensor:
    """``ids`` as ``[n, seqlen]`` non-overlapping windows (tail dropped), checked."""
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise PtqInputError(
            f"evaluation text has {ids.numel()} tokens, fewer than --seqlen {seqlen}"
        )
    if batch_size < 1:
        raise PtqInputError(f"batch size must be at least 1, got {batch_size}")
    return ids[: n_windows * seqlen].view(n_windows, seqlen)


def _window_logits(
    model: nn.Module, windows: torch.Tensor, batch_size: int, progress: bool, desc: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits [seqlen-1, V] float32, targets [seqlen-1])`` per window, in order.

    Windows run ``batch_size`` at a time (the last batch holds the remainder); logits are
    upcast one window at a time, which bounds the float32 memory.
    """
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, unit="batch"):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch).logits
        for row in range(batch.shape[0]):
            yield logits[row, :-1].float(), batch[row, 1:]


@torch.no_grad()
def token_logprobs(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    seqlen: int = 512,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "eval",
) -> torch.Tensor:
    """Log-probability of every predicted token, window by window.

    ``ids`` is cut into ``n = len(ids) // seqlen`` non-overlapping windows (the tail is
    dropped); within a window the model predicts token ``t+1`` from tokens ``0..t``.

    Returns:
        float32 ``[n, seqlen - 1]``: ``log p(x_{t+1} | x_{<=t})`` from the logits upcast
        to float32.

    Raises:
        PtqInputError: Fewer tokens than one window, or a batch size below 1.
    """
    windows = _windows(ids, seqlen, batch_size)
    rows = [
        -nn.functional.cross_entropy(logits, targets, reduction="none")
        for logits, targets in _window_logits(model, windows, batch_size, progress, desc)
    ]
    return torch.stack(rows)


def perplexity_from_logprobs(logprobs: torch.Tensor) -> float:
    """``exp(-mean log p)`` over every predicted token (summed in float64)."""
    return math.exp(-float(logprobs.double().sum()) / logprobs.numel())


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    seqlen: int = 512,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "eval",
) -> float:
    """Perplexity of ``model`` over ``ids`` split into non-overlapping ``seqlen`` windows.

    Each window's NLL is summed by ``cross_entropy(reduction="sum")`` in float32 and the
    window sums in float64; equal, up to float32 summation order, to
    ``perplexity_from_logprobs(token_logprobs(...))``.

    Raises:
        PtqInputError: Fewer tokens than one window, or a batch size below 1.
    """
    windows = _windows(ids, seqlen, batch_size)
    total_nll = 0.0
    for logits, targets in _window_logits(model, windows, batch_size, progress, desc):
        total_nll += float(nn.functional.cross_entropy(logits, targets, reduction="sum"))
    return math.exp(total_nll / (windows.shape[0] * (seqlen - 1)))
