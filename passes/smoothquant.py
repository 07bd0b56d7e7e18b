"""SmoothQuant: migrate activation outliers into the weights (Xiao et al., 2023).

For a producer -> readers group (:mod:`ptq.passes._groups`) with reader input ``X``
and reader weights ``W``, the per-input-channel smoothing factor is

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (paper, eq. 4)

and ``Y = (X diag(s)^-1)(diag(s) W^T)``: ``X' = X / s`` is folded into the producer
(RMSNorm weight ``w <- w / s``, or a producer linear's rows ``W_p <- W_p / s``) and
``W' = W diag(s)`` into every reader, so the FP model's outputs are unchanged.
``alpha`` is fixed, or searched per group on a grid minimising the readers' quantized
output error ``sum_r ||X W_r^T - fq_a(X / s) fq_w(W_r diag(s))^T||^2`` under the plan's
weight and activation formats, on a sample of calibration rows; the search also tries
``s = 1`` and leaves the group unsmoothed when that wins.

For ``v_proj -> o_proj`` with grouped-query attention, ``n_rep`` query heads read one
value head; their statistics are reduced by ``max`` and ``s`` repeated for each.

Block by block: the statistics of block ``i`` are observed on the floating-point
stream (the FP model as transformed by earlier passes, e.g. rotation, before any
smoothing: :meth:`ptq.calibration.units.Unit.run_fp`), exactly what a whole-model
forward of that model would show, then block ``i``'s factors are folded. The search's
row sample is drawn with a generator seeded per block, so a resumed run draws the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ptq.activation import fake_quantize_activation
from ptq.formats import QuantFormat, fake_quantize
from ptq.passes._groups import LinearGroup, fold_scales, foldable, llama_groups, tensor_attr
from ptq.passes.act_calibration import observe_inputs
from ptq.pipeline import Pass, PassContext, QuantState
from ptq.scheme import ActivationScheme

EPS = 1e-5


def smoothing_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``; channels with no signal get ``s = 1``."""
    x = x_absmax.double().clamp(min=EPS)
    w = w_absmax.double().clamp(min=EPS)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.float()


def quantized_output_error(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    formats: list[tuple[QuantFormat, ActivationScheme | None]],
    s: torch.Tensor,
    reference: list[torch.Tensor] | None = None,
) -> float:
    """``sum_r ||X W_r^T - fq_a(X / s) fq_w(W_r diag(s))^T||^2`` over rows of ``X``.

    ``reference`` may hold the precomputed ``X W_r^T`` (reused across a grid search).
    """
    total = 0.0
    xs = x / s
    refs = reference if reference is not None else [x @ w.T for w in weights]
    for w, y, (wfmt, act) in zip(weights, refs, formats, strict=True):
        xq = xs
        if act is not None:
            static = None if act.dynamic else (xs.abs().amax() / act.element.max_value)
            xq = fake_quantize_activation(xs, act, static)
        wq = fake_quantize(w * s, wfmt)
        total += float((y - xq @ wq.T).pow(2).sum())
    return total


@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig:
    """Args:
    alpha: Migration strength used when ``search`` is False.
    search: Pick alpha per group from ``grid`` by quantized output error.
    grid: Candidate alphas for the search.
    attn_v_o: Also smooth ``v_proj -> o_proj`` (GQA head repetition handled).
    mlp_up_down: Also smooth ``up_proj -> down_proj``.
    search_tokens: Calibration rows kept per group for the search.
    """

    alpha: float = 0.5
    search: bool = False
    grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    attn_v_o: bool = True
    mlp_up_down: bool = True
    search_tokens: int = 512

    def __post_init__(self) -> None:
        for a in (self.alpha, *self.grid):
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {a}")
        if self.search and not self.grid:
            raise ValueError("SmoothQuant search needs a non-empty grid")
        if self.search_tokens < 1:
            raise ValueError("search_tokens must be >= 1")


def _eligible(model: nn.Module, group: LinearGroup, cfg: SmoothQuantConfig) -> bool:
    if group.kind == "linear" and group.producer.endswith("v_proj"):
        return cfg.attn_v_o
    if group.kind == "linear":
        return cfg.mlp_up_down and foldable(model, group)
    return True


class SmoothQuantPass(Pass):
    """Fold SmoothQuant factors into the FP model (before weight quantization)."""

    name: ClassVar[str] = "smoothquant"
    ensures: ClassVar[tuple[str, ...]] = ("smoothed",)
    needs_calibration: ClassVar[bool] = True
    observes_fp: ClassVar[bool] = True
    before_weights: ClassVar[bool] = True

    def __init__(self, config: SmoothQuantConfig | None = None) -> None:
        self.config = config or SmoothQuantConfig()

    def prepare(self, state: QuantState, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise ValueError("smoothquant needs calibration tokens (ctx.calibration is None)")
        llama_groups(state.model)  # the layout check, before any weight is loaded

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        unit = state.unit
        assert unit is not None
        if unit.kind != "block":
            return
        cfg = self.config
        model = state.model
        groups = [
            g
            for g in llama_groups(model)
            if g.producer.startswith(unit.prefix)
            and _eligible(model, g, cfg)
            and any(r in state.plan.layers for r in g.readers)
        ]
        if not groups:
            return
        first = {g.readers[0]: g for g in groups}
        absmax: dict[str, torch.Tensor] = {}
        samples: dict[str, list[torch.Tensor]] = {}
        assert unit.fp is not None
        per_batch = math.ceil(cfg.search_tokens / len(unit.fp))
        gen = ctx.generator(salt=0x5A00000 + unit.index)

        def observe(name: str, x: torch.Tensor) -> None:
            a = x.abs().amax(dim=0)
            absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)
            if cfg.search:
                idx = torch.randperm(x.shape[0], generator=gen)[:per_batch].to(x.device)
                samples.setdefault(name, []).append(x[idx].clone())

        observe_inputs(model, list(first), [unit.run_fp], observe)
        chosen: dict[str, float | str] = {}
        for g in groups:
            weights = [
                tensor_attr(model.get_submodule(r), "weight").detach().float() for r in g.readers
            ]
            w_absmax = g.to_producer(torch.stack([w.abs().amax(dim=0) for w in weights]).amax(0))
            x_absmax = g.to_producer(absmax[g.readers[0]])
            alpha: float | None = cfg.alpha
            if cfg.search:
                x = torch.cat(samples[g.readers[0]])
                alpha = self._search(state, g, weights, x, x_absmax, w_absmax)
            if alpha is not None:
                fold_scales(model, g, smoothing_factors(x_absmax, w_absmax, alpha))
            chosen[g.producer] = "off" if alpha is None else alpha
        record = ctx.records.setdefault("smoothquant", {"search": cfg.search, "alpha": {}})
        record["alpha"].update(chosen)

    def _search(
        self,
        state: QuantState,
        g: LinearGroup,
        weights: list[torch.Tensor],
        x: torch.Tensor,
        x_absmax: torch.Tensor,
        w_absmax: torch.Tensor,
    ) -> float | None:
        """The grid alpha with the lowest quantized output error (None: no smoothing wins)."""
        planned = [i for i, r in enumerate(g.readers) if r in state.plan.layers]
        formats = [
            (state.plan.layers[g.readers[i]].weight, state.plan.layers[g.readers[i]].activation)
            for i in planned
        ]
        ws = [weights[i] for i in planned]
        ref = [x @ w.T for w in ws]
        best: float | None = None
        best_err = quantized_output_error(x, ws, formats, torch.ones_like(x_absmax[:1]), ref)
        for alpha in self.config.grid:
            s = g.to_reader(smoothing_factors(x_absmax, w_absmax, alpha))
            err = quantized_output_error(x, ws, formats, s, ref)
            if err < best_err:
                best, best_err = alpha, err
        return best
