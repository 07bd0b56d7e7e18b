"""Perplexity on held-out text: non-overlapping windows, ``ppl = exp(mean NLL)``.

This is the GPTQ/AWQ protocol (docs/invariants.md, "Evaluation protocol") with a shorter default window
(512 tokens) and a token budget so that evaluation fits a 2-core CPU.
"""

from __future__ import annotations

import math
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


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    seqlen: int = 512,
    progress: bool = True,
    desc: str = "eval",
) -> float:
    """Perplexity of ``model`` over ``ids`` split into non-overlapping ``seqlen`` windows.

    Raises:
        PtqInputError: Fewer tokens than one window.
    """
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise PtqInputError(
            f"evaluation text has {ids.numel()} tokens, fewer than --seqlen {seqlen}"
        )
    total_nll, count = 0.0, 0
    for w in tqdm(range(n_windows), desc=desc, disable=not progress, unit="win"):
        window = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
        logits = model(input_ids=window).logits.float()
        nll = nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total_nll += float(nll)
        count += seqlen - 1
    return math.exp(total_nll / count)
