"""AWQ as a pass: activation-aware scales and clipping, block by block (maths: :mod:`awq_math`).

On each decoder block of the runner, before the weight pass rounds it:

1. one sweep of the block over the calibration stream (the quantized model's activations
   entering it: :meth:`~ptq.calibration.units.Unit.forwards`) records, for every
   producer -> readers group of the block's structural model (norm -> readers,
   v -> o, up -> down; :mod:`ptq.frontend.structure`), the mean
   ``|x|`` of the readers' input channels, a seeded sample of input rows, and the
   inputs of the group's *inspected* module (attention for q/k/v, the MLP for gate/up,
   the reader itself for o_proj and down_proj) up to ``search_tokens`` tokens;
2. per group, in forward order, the ``alpha`` whose scales give the least inspected-module
   output error (readers fake-quantized in their planned formats) is chosen and its
   scales folded into the producer and readers (SmoothQuant's fold,
   :func:`~ptq.passes.smoothquant.fold_smoothing`);
   each group's inputs were recorded before any scale of the block was folded, and the
   folds leave every later group's inputs unchanged in floating point;
3. each planned reader (except ``clip_skip``, AWQ's q/k) gets its clipping search on
   its sampled input rows, divided by its group's scales.

The weight pass that follows (RTN, GPTQ, ...) then rounds the scaled, clipped weights:
``--method awq`` is AWQ + RTN, ``--method awq+gptq`` AWQ + GPTQ. The layout written is
the format's own (scales are folded into FP weights and norms, nothing new is stored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ptq.formats import QuantFormat

# The network structure AWQ reads: the block's structural model (the groups SmoothQuant
# folds: norm -> readers, v -> o, up -> down) and SmoothQuant's fold.
from ptq.frontend.structure import LinearGroup
from ptq.passes._groups import block_structure, structure_of, weight_view
from ptq.passes.awq_capture import GroupInputs, capture_group_inputs, inspected
from ptq.passes.awq_math import awq_scales, clip_search, scaled_fake_weight, weight_magnitude
from ptq.passes.smoothquant import SmoothQuantConfig, fold_smoothing, smoothing_groups
from ptq.pipeline import Pass, PassContext, QuantState
from ptq.steps import record_step

SALT = 0xA3000000


@dataclass(frozen=True, kw_only=True)
class AWQConfig:
    """AWQ knobs (Lin et al., 2024).

    Args:
        grid: Number of ``alpha`` values ``0, 1/grid, ..., (grid-1)/grid`` searched.
        duo_scaling: Candidates ``s_X^a / s_W^(1-a)`` instead of the paper's ``s_X^a``.
        clip: Run the clipping search after scaling.
        clip_grid: Clip ratios step ``1 / clip_grid``.
        max_shrink: Smallest clip ratio is ``1 - max_shrink``.
        clip_skip: Layer-name suffixes with no clipping (q/k: their output error does not
            measure attention scores).
        clip_tokens: Input rows sampled per group for the clipping search.
        search_tokens: Calibration tokens (the first batches) whose inspected-module
            outputs score the scales; the mean ``|x|`` uses every batch. Each grid point
            reruns the inspected modules on them, which dominates AWQ's time on a CPU
            (SmolLM2, 2 cores: ~7 s per block per 1024 tokens).
    """

    grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_skip: tuple[str, ...] = ("q_proj", "k_proj")
    clip_tokens: int = 512
    search_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.grid < 1 or self.clip_grid < 1:
            raise ValueError("AWQ grid and clip_grid must be >= 1")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.clip_tokens < 1 or self.search_tokens < 1:
            raise ValueError("clip_tokens and search_tokens must be >= 1")


def block_groups(state: QuantState, planned: set[str]) -> list[LinearGroup]:
    """The current block's producer -> readers groups, in forward order, that SmoothQuant's
    fold can scale (:func:`~ptq.passes.smoothquant.smoothing_groups`: every norm group,
    v -> o and up -> down unless an online Hadamard reads the down projection's input) and
    that have a reader in ``planned``.
    """
    block = block_structure(state)
    return [
        g
        for g in smoothing_groups(block, state.model, SmoothQuantConfig())
        if any(r in planned for r in g.readers)
    ]


class AWQPass(Pass):
    """Fold AWQ scales and clip weights in the FP model, block by block (before rounding)."""

    name: ClassVar[str] = "awq"
    ensures: ClassVar[tuple[str, ...]] = ("awq_scaled",)
    needs_calibration: ClassVar[bool] = True
    before_weights: ClassVar[bool] = True

    def __init__(self, config: AWQConfig | None = None) -> None:
        self.config = config or AWQConfig()

    def prepare(self, state: QuantState, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise ValueError("awq needs calibration tokens (ctx.calibration is None)")
        if structure_of(state).block_path is None:  # before any weight is loaded
            raise ValueError("awq needs a model with repeated blocks (a decoder LM)")

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        unit = state.unit
        assert unit is not None
        if unit.kind != "block":
            return
        model, plan = state.model, state.plan
        groups = block_groups(state, set(plan.layers))
        if not groups:
            return
        cfg = self.config
        gen = ctx.generator(salt=SALT + unit.index)
        seen = capture_group_inputs(model, groups, unit.forwards(), cfg, gen)
        record = ctx.records.setdefault("awq", {"alpha": {}, "clip_ratio": {}})
        for g in groups:
            alpha, s = self._search(model, plan.layers, g, seen[g.producer])
            fold_smoothing(model, g, s)
            record["alpha"][g.producer] = alpha
            if cfg.clip:
                rows = seen[g.producer].rows / g.to_reader(s)[None, :]
                for name in g.readers:
                    lp = plan.layers.get(name)
                    if lp is None or name.endswith(cfg.clip_skip):
                        continue
                    w = weight_view(model.get_submodule(name))
                    clipped, ratio = clip_search(w, rows, lp.weight, cfg.clip_grid, cfg.max_shrink)
                    with torch.no_grad():
                        w.copy_(clipped.to(w.dtype))
                    record["clip_ratio"][name] = float(ratio.mean())
            for name in g.readers:
                if name in plan.layers:
                    record_step(ctx.records, name, self.name)

    @torch.no_grad()
    def _search(
        self, model: nn.Module, layers: dict[str, Any], g: LinearGroup, seen: GroupInputs
    ) -> tuple[float, torch.Tensor]:
        """The grid ``alpha`` (and its producer-channel scales) with the least output error."""
        planned = [r for r in g.readers if r in layers]
        weights = {r: weight_view(model.get_submodule(r)) for r in planned}
        saved = {r: w.detach().clone() for r, w in weights.items()}
        module = inspected(model, g)
        refs = [_output(module(*a, **kw)) for a, kw in seen.inputs]
        x_mean = g.to_producer(seen.mean_abs())
        w_mean = None
        if self.config.duo_scaling:
            fmt: QuantFormat = layers[planned[0]].weight
            w_mean = g.to_producer(weight_magnitude([saved[r] for r in planned], fmt))
        best: tuple[float, float, torch.Tensor] | None = None
        try:
            for i in range(self.config.grid):
                alpha = i / self.config.grid
                s = awq_scales(x_mean, alpha, w_mean)
                sr = g.to_reader(s)
                for r, w in weights.items():
                    w.copy_(scaled_fake_weight(saved[r], sr, layers[r].weight))
                err = 0.0
                for (a, kw), ref in zip(seen.inputs, refs, strict=True):
                    err += float((_output(module(*a, **kw)) - ref).float().pow(2).sum())
                if best is None or err < best[1]:
                    best = (alpha, err, s)
        finally:
            for r, w in weights.items():
                w.copy_(saved[r])
        assert best is not None
        if not math.isfinite(best[1]):
            return 0.0, torch.ones_like(x_mean)
        return best[0], best[2]


def _output(out: Any) -> torch.Tensor:
    """A module's main output (attention returns ``(hidden, weights)``)."""
    return out[0] if isinstance(out, tuple | list) else out
