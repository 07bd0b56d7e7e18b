"""Mixed-precision bit allocation as a pass: measure, solve the ILP, rewrite the plan.

Hubara et al., "Improving Post Training Neural Quantization: Layer-wise Calibration and
Integer Programming" (2020): with per-layer sensitivities ``dL[l, c]`` (measured once,
cached; :mod:`ptq.passes.allocation.measure`) and exact costs ``cost[l, c]``, choose
``x[l, c] in {0, 1}`` minimising ``sum x dL`` subject to one candidate per layer (or per
tied group) and ``sum x cost <= B`` (:func:`~ptq.passes.allocation.solver.solve_ilp`).

The pass decides for the whole model at once, so it splits the block-wise run in two
(:func:`ptq.calibration.runner.run_passes`): the passes before it (rotation,
SmoothQuant) transform the model in a first sweep, the sensitivities are measured on
the transformed model read one block at a time, and the weight pass (RTN, GPTQ, ...)
runs in the second sweep. It sets each planned layer's format to its chosen candidate; a dense choice (``fp16``) moves the layer to
``plan.skipped`` with reason ``"allocation: fp16"``. LoRC choices are recorded in
``ctx.records["allocation"]["lorc"]`` and applied after the weight pass by
:class:`AllocatedLoRCPass` (which wraps the weight pass).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from ptq.models.weight_source import WeightSource
from ptq.passes.allocation.measure import Estimator, MeasureConfig
from ptq.pipeline import Pass, PassContext, QuantState
from ptq.plan import QuantPlan

DEFAULT_CANDIDATES = "int8_channel,fp8,int4_g128,int4_g64,nvfp4,mxfp4,int3_g64,fp16"
DEFAULT_TIES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)


@dataclass(frozen=True, kw_only=True)
class BitAllocationConfig:
    """Args:
    budget: ``"4.5bits"``, ``"70MB"`` or a latency ``"2ms"`` (roofline model).
    latency_budget: A latency (``"0.05ms"``) that must hold *as well as* a size
        ``budget``: both are rows of one integer program.
    kernel_efficiency: Latency model: a preset (``h200-ptq-fp16``, ``roofline``), a
        JSON file or an inline table (:mod:`ptq.passes.allocation.kernel_efficiency`);
        None: ``roofline`` (every kernel at peak bandwidth).
    candidates: Comma-separated candidate names (see ``ptq.passes.allocation.registry``).
    estimator: ``fisher`` (default), ``hessian``, ``loss`` or ``kl``.
    samples, seqlen: Calibration subset used for measuring.
    tie: Suffix groups whose members under one parent share a candidate (q/k/v, gate/up);
        ``()`` unties everything.
    min_bits_first_last: First and last planned layers get candidates with at least
        this many bits per element (None: no constraint).
    cache_dir: Where sensitivity tables are cached (None: ``$PTQ_CACHE/sensitivity``).
    method: ``ilp`` (exact) or ``greedy`` (baseline).
    """

    budget: str
    latency_budget: str | None = None
    kernel_efficiency: str | None = None
    candidates: str = DEFAULT_CANDIDATES
    estimator: Estimator = "fisher"
    samples: int = 8
    seqlen: int = 256
    tie: tuple[tuple[str, ...], ...] = DEFAULT_TIES
    min_bits_first_last: int | None = None
    cache_dir: Path | None = None
    method: str = "ilp"

    def __post_init__(self) -> None:
        from ptq.passes.allocation import parse_budget, parse_candidates
        from ptq.passes.allocation.kernel_efficiency import parse_latency_model

        main = parse_budget(self.budget)
        if self.latency_budget is not None:
            if parse_budget(self.latency_budget).kind != "seconds":
                raise ValueError(f"latency budget {self.latency_budget!r} must be a time (2ms)")
            if main.kind == "seconds":
                raise ValueError(
                    f"budget {self.budget!r} and latency budget {self.latency_budget!r} are "
                    "both latencies; give a size (4.5bits, 70MB) and a latency"
                )
        parse_latency_model(self.kernel_efficiency)
        parse_candidates(self.candidates)
        self.measure_config()
        if self.method not in ("ilp", "greedy"):
            raise ValueError(f"allocation method must be ilp or greedy, got {self.method!r}")
        if self.min_bits_first_last is not None and not 1 <= self.min_bits_first_last <= 32:
            raise ValueError(
                f"min_bits_first_last must be in 1..32, got {self.min_bits_first_last}"
            )

    def measure_config(self) -> MeasureConfig:
        return MeasureConfig(estimator=self.estimator, samples=self.samples, seqlen=self.seqlen)


def tied_groups(layers: Sequence[str], tie: Sequence[Sequence[str]]) -> list[list[str]]:
    """Layers under one parent module whose last name part is in the same suffix group."""
    groups: dict[tuple[str, int], list[str]] = {}
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        for gi, suffixes in enumerate(tie):
            if leaf in suffixes:
                groups.setdefault((parent, gi), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def apply_allocation(plan: QuantPlan, choice: Mapping[str, str], candidates: Sequence[Any]) -> None:
    """Rewrite ``plan``: chosen format per layer; dense choices move to ``plan.skipped``."""
    by_name = {c.name: c for c in candidates}
    for layer, cname in choice.items():
        cand = by_name[cname]
        lp = plan.layers[layer]
        if cand.fmt is None:
            del plan.layers[layer]
            plan.skipped[layer] = f"allocation: {cname}"
        else:
            plan.layers[layer] = replace(lp, weight=cand.fmt)


def _cache_dir(config: BitAllocationConfig) -> Path:
    if config.cache_dir is not None:
        return config.cache_dir
    from ptq.models.paths import cache_dir

    return cache_dir() / "sensitivity"


class BitAllocationPass(Pass):
    """Measure (or load cached) sensitivities, solve for the budget, rewrite the plan."""

    name: ClassVar[str] = "bit_allocation"
    ensures: ClassVar[tuple[str, ...]] = ("allocation",)
    needs_calibration: ClassVar[bool] = True
    before_weights: ClassVar[bool] = True
    decides: ClassVar[bool] = True

    def __init__(self, config: BitAllocationConfig) -> None:
        self.config = config

    def decide(self, source: WeightSource, state: QuantState, ctx: PassContext) -> None:
        from ptq.passes.allocation import (
            allowed_by_pattern,
            at_least_bits,
            build_problem,
            parse_budget,
            parse_candidates,
            solve_greedy,
            solve_ilp,
        )
        from ptq.passes.allocation.kernel_efficiency import parse_latency_model
        from ptq.passes.allocation.measure import cached_sensitivity, supported

        cfg = self.config
        if not isinstance(ctx.calibration, torch.Tensor):
            raise ValueError("pass 'bit_allocation' needs calibration token ids (none were loaded)")
        layers = list(state.plan.layers)
        prefix = f"{source.block_path}." if source.block_path is not None else ""
        outside = [n for n in layers if not n.startswith(prefix)] if prefix else []
        if outside:
            print(
                f"note: {len(outside)} layer(s) outside the repeated blocks keep the scheme's "
                f"format and are not in the budget: {', '.join(outside)}"
            )
            layers = [n for n in layers if n not in outside]
        cands, excluded = supported(parse_candidates(cfg.candidates))
        for msg in excluded:
            ctx.logger.warning(msg)
            print(f"note: {msg}")
        table, path, hit = cached_sensitivity(
            source,
            layers,
            cands,
            ctx.calibration,
            cfg.measure_config(),
            _cache_dir(cfg),
            progress=ctx.progress,
        )
        print(f"sensitivities ({cfg.estimator}) {'loaded from' if hit else 'saved to'} {path}")
        budget = parse_budget(cfg.budget)
        timed = budget.kind == "seconds" or cfg.latency_budget is not None
        latency = parse_latency_model(cfg.kernel_efficiency) if timed else None
        budgets = [budget] + ([parse_budget(cfg.latency_budget)] if cfg.latency_budget else [])
        allowed: dict[str, frozenset[str]] = {}
        if cfg.min_bits_first_last is not None:
            keep = at_least_bits(cands, cfg.min_bits_first_last)
            ends = [re.escape(layers[0]), re.escape(layers[-1])]
            allowed = allowed_by_pattern(layers, dict.fromkeys(ends, keep))
        problem = build_problem(
            table,
            cands,
            latency=latency,
            allowed=allowed,
            tied=tied_groups(layers, cfg.tie),
            unit="seconds" if budget.kind == "seconds" else "bytes",
        )
        solve = solve_ilp if cfg.method == "ilp" else solve_greedy
        alloc = solve(problem, budgets)
        apply_allocation(state.plan, alloc.choice, cands)
        lorc = {n: c for n, c in alloc.choice.items() if "+lorc" in c}
        ctx.records["allocation"] = {
            **alloc.to_dict(),
            "estimator": cfg.estimator,
            "kernel_efficiency": cfg.kernel_efficiency,
            "candidates": [c.name for c in cands],
            "excluded": excluded,
            "sensitivity_file": None if path is None else str(path),
            "lorc": {
                n: {"rank": _cand(cands, c).lorc_rank, "candidate": c} for n, c in lorc.items()
            },
        }
        timing = "" if alloc.seconds is None else f", modelled {alloc.seconds * 1e3:.4g} ms"
        print(
            f"allocation ({alloc.method}, {alloc.status}): {alloc.bits_per_weight:.4f} bits/weight, "
            f"{alloc.total_bytes:,} bytes{timing}, predicted dL {alloc.objective:.4g}"
        )
        if ctx.progress:
            for layer, cname in alloc.choice.items():
                print(f"  {layer:<48} {cname}")


def _cand(cands: Sequence[Any], name: str) -> Any:
    return next(c for c in cands if c.name == name)


class AllocatedLoRCPass(Pass):
    """Run ``inner`` (the weight pass), then attach LoRC factors where the allocation chose
    a ``+lorc`` candidate (ZeroQuant-V2 ``W ~ Q(W) + U_r V_r``); a no-op wrapper otherwise."""

    name: ClassVar[str] = "allocated_lorc"

    def __init__(self, inner: Pass) -> None:
        self.inner = inner
        self.config = None
        self.requires = inner.requires  # type: ignore[misc]
        self.ensures = inner.ensures  # type: ignore[misc]
        self.needs_calibration = inner.needs_calibration  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"allocated_lorc(inner={self.inner!r})"

    def inner_passes(self) -> list[Pass]:
        return [self.inner]

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        from ptq.passes.allocation import parse_candidate
        from ptq.passes.allocation.measure import lorc_factor_format
        from ptq.passes.lorc import apply_lorc, snapshot_weights

        assert state.unit is not None
        chosen = ctx.records.get("allocation", {}).get("lorc", {})
        mine = {n: info for n, info in chosen.items() if n in state.unit.layers}
        fp = snapshot_weights(state.model, list(mine))
        self.inner.run_unit(state, ctx)
        by_format: dict[str, dict[str, int]] = {}
        for layer, info in mine.items():
            factor_fmt = lorc_factor_format(parse_candidate(info["candidate"]))
            assert factor_fmt is not None
            by_format.setdefault(factor_fmt, {})[layer] = int(info["rank"])
        for name, ranks in by_format.items():
            apply_lorc(state.model, fp, ranks, name)  # type: ignore[arg-type]
