"""Does evaluation depend on how it is batched and threaded? (``ptq eval --reproducibility``)

Yuan et al. ("Give Me FP32 or Give Me Death? Challenges and Solutions for Reproducible
Reasoning", 2025) show that in bf16/fp16 a model's outputs change with batch size and
thread or GPU count, because a kernel's reduction order follows the shapes and the
parallel split, and 16-bit rounding makes those orders visible; LayerCast (16-bit
weights, fp32 computation; :mod:`ptq.precision`) removes most of it.

Here the same token windows are evaluated under every combination of:

* batch size ``B`` in ``batch_sizes`` (default 1, 4, 16): ``B`` consecutive windows of
  ``seqlen`` tokens are stacked into one ``[B, seqlen]`` input, so each linear layer
  multiplies ``B * seqlen`` rows at once and attention runs ``B`` sequences per call
  (the tokens and each token's context never change);
* intra-op thread count in ``threads`` (default 1, 2), set in this process with
  ``torch.set_num_threads`` before each run and restored afterwards.

For each dtype (and LayerCast on or off) the report gives the largest difference of
any token's log-probability between any two settings (also split into: across batch
sizes at equal threads, across threads at equal batch size) and the perplexity spread
(max - min over the settings).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ptq.evaluate import perplexity_from_logprobs, token_logprobs
from ptq.precision import EVAL_DTYPES, cast_model

__all__ = [
    "DEFAULT_CONFIGS",
    "ReproRow",
    "Setting",
    "format_table",
    "measure_settings",
    "run_reproducibility",
    "summarize",
]

#: (dtype name, LayerCast) pairs of the report; LayerCast in fp32 is plain fp32.
DEFAULT_CONFIGS: tuple[tuple[str, bool], ...] = (
    ("fp32", False),
    ("bf16", False),
    ("bf16", True),
    ("fp16", False),
    ("fp16", True),
)


@dataclass(frozen=True, order=True)
class Setting:
    """One way of running the same evaluation."""

    batch_size: int
    threads: int


@dataclass(frozen=True)
class ReproRow:
    """The variation of one (dtype, LayerCast) configuration across settings.

    Attributes:
        max_diff: ``max_t (max_s lp_s[t] - min_s lp_s[t])`` over tokens ``t`` and all
            settings ``s``.
        max_diff_batch: The same with ``s`` ranging over batch sizes at one thread count
            (maximised over thread counts).
        max_diff_threads: Over thread counts at one batch size.
        tokens_changed: Fraction of tokens whose log-probability is not identical in all
            settings.
    """

    dtype: str
    layercast: bool
    ppl: dict[Setting, float]
    max_diff: float
    max_diff_batch: float
    max_diff_threads: float
    tokens_changed: float

    @property
    def ppl_spread(self) -> float:
        """``max - min`` of the perplexities over the settings."""
        return max(self.ppl.values()) - min(self.ppl.values())


def measure_settings(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    seqlen: int,
    batch_sizes: Sequence[int],
    threads: Sequence[int],
) -> dict[Setting, torch.Tensor]:
    """Per-token log-probabilities of ``model`` under every (batch size, threads) setting."""
    before = torch.get_num_threads()
    out: dict[Setting, torch.Tensor] = {}
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for batch in batch_sizes:
                out[Setting(batch, n_threads)] = token_logprobs(
                    model, ids, seqlen=seqlen, batch_size=batch, progress=False
                )
    finally:
        torch.set_num_threads(before)
    return out


def _spread(group: Sequence[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(list(group))
    return stacked.amax(0) - stacked.amin(0)


def summarize(dtype: str, layercast: bool, logprobs: dict[Setting, torch.Tensor]) -> ReproRow:
    """Reduce the per-setting log-probabilities of one configuration to a report row."""
    settings = sorted(logprobs)
    every = _spread([logprobs[s] for s in settings])
    by_batch = [
        float(_spread([logprobs[s] for s in settings if s.threads == t]).max())
        for t in sorted({s.threads for s in settings})
    ]
    by_threads = [
        float(_spread([logprobs[s] for s in settings if s.batch_size == b]).max())
        for b in sorted({s.batch_size for s in settings})
    ]
    return ReproRow(
        dtype=dtype,
        layercast=layercast,
        ppl={s: perplexity_from_logprobs(logprobs[s]) for s in settings},
        max_diff=float(every.max()),
        max_diff_batch=max(by_batch),
        max_diff_threads=max(by_threads),
        tokens_changed=float((every > 0).double().mean()),
    )


def run_reproducibility(
    load: Callable[[], nn.Module],
    ids: torch.Tensor,
    *,
    seqlen: int,
    configs: Sequence[tuple[str, bool]] = DEFAULT_CONFIGS,
    batch_sizes: Sequence[int] = (1, 4, 16),
    threads: Sequence[int] = (1, 2),
    on_row: Callable[[ReproRow], None] | None = None,
) -> list[ReproRow]:
    """Measure every configuration; ``load()`` returns a fresh float32 model each time."""
    rows: list[ReproRow] = []
    for dtype, layercast in configs:
        model = cast_model(load(), EVAL_DTYPES[dtype], layercast=layercast)
        logprobs = measure_settings(
            model, ids, seqlen=seqlen, batch_sizes=batch_sizes, threads=threads
        )
        del model
        row = summarize(dtype, layercast, logprobs)
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def format_table(rows: Sequence[ReproRow]) -> str:
    """A Markdown table: one row per configuration."""
    header = (
        "| dtype | LayerCast | max abs dlogp, all settings | across batch sizes | "
        "across threads | tokens changed | ppl (B=1, 1 thread) | ppl spread |"
    )
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        first = r.ppl[min(r.ppl)]
        layercast = "yes" if r.layercast else "no"
        if r.layercast and r.dtype == "fp32":
            layercast = "yes (= fp32)"
        lines.append(
            f"| {r.dtype} | {layercast} | {r.max_diff:.3g} | {r.max_diff_batch:.3g} | "
            f"{r.max_diff_threads:.3g} | {100 * r.tokens_changed:.1f} % | {first:.4f} | "
            f"{r.ppl_spread:.3g} |"
        )
    return "\n".join(lines)
