"""Size and latency budgets together: the ILP equals brute force over both rows; greedy
keeps both and never beats it; joint infeasibility is reported as such."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ptq.passes.allocation import (
    AllocationProblem,
    Candidate,
    InfeasibleBudgetError,
    LatencyModel,
    SensitivityTable,
    build_problem,
    parse_candidates,
    solve_greedy,
    solve_ilp,
    sweep,
)
from ptq.passes.allocation.problem import _units


def two_cost_problem(rng: np.random.Generator, n_layers: int, n_cands: int) -> AllocationProblem:
    """Random bytes and independent random seconds per (layer, candidate)."""
    layers = tuple(f"l{i}" for i in range(n_layers))
    nbytes = rng.integers(10, 1000, size=(n_layers, n_cands)).astype(np.float64)
    seconds = rng.uniform(1e-6, 1e-3, size=(n_layers, n_cands))
    return AllocationProblem(
        layers=layers,
        candidates=tuple(Candidate(f"c{j}", None) for j in range(n_cands)),
        loss=rng.uniform(0.0, 5.0, size=(n_layers, n_cands)),
        nbytes=nbytes,
        cost=nbytes,
        unit="bytes",
        allowed=np.ones((n_layers, n_cands), dtype=bool),
        units=_units(layers, []),
        shapes=tuple((8, 8) for _ in layers),
        seconds=seconds,
    )


def brute_force_two(problem: AllocationProblem, max_bytes: float, max_seconds: float) -> float:
    assert problem.seconds is not None
    rows = np.arange(len(problem.layers))
    best = math.inf
    for picks in itertools.product(range(len(problem.candidates)), repeat=len(rows)):
        p = np.array(picks)
        if problem.nbytes[rows, p].sum() <= max_bytes and (
            problem.seconds[rows, p].sum() <= max_seconds
        ):
            best = min(best, float(problem.loss[rows, p].sum()))
    return best


def test_ilp_matches_brute_force_under_two_budgets() -> None:
    rng = np.random.default_rng(7)
    beaten = 0
    for _ in range(25):
        problem = two_cost_problem(rng, int(rng.integers(4, 7)), int(rng.integers(3, 5)))
        assert problem.seconds is not None
        max_b = float(rng.uniform(problem.min_cost("bytes"), problem.nbytes.max(1).sum()))
        max_s = float(rng.uniform(problem.min_cost("seconds"), problem.seconds.max(1).sum()))
        best = brute_force_two(problem, max_b, max_s)
        if not math.isfinite(best):
            with pytest.raises(InfeasibleBudgetError, match="together"):
                solve_ilp(problem, [max_b, f"{max_s}s"])
            continue
        alloc = solve_ilp(problem, [max_b, f"{max_s}s"])
        assert alloc.objective == pytest.approx(best, abs=1e-6)
        assert alloc.total_bytes <= max_b and alloc.seconds is not None
        assert alloc.seconds <= max_s * (1 + 1e-12)
        assert [u for u, _ in alloc.budgets] == ["bytes", "seconds"]
        try:
            greedy = solve_greedy(problem, [max_b, f"{max_s}s"])
        except InfeasibleBudgetError:
            beaten += 1  # its start broke a budget the ILP could meet
            continue
        assert greedy.total_bytes <= max_b and greedy.seconds is not None
        assert greedy.seconds <= max_s * (1 + 1e-12)
        assert greedy.objective >= alloc.objective - 1e-9
        beaten += greedy.objective > alloc.objective + 1e-9
    assert beaten > 0  # two rows are where a ratio rule goes wrong


def test_latency_budget_changes_the_choice_with_slow_kernels() -> None:
    """Half-speed FP4 kernels: under a latency cap the ILP trades NVFP4 for INT4."""
    cands = parse_candidates("int4_g128,nvfp4,fp16")
    layers = [f"l{i}" for i in range(4)]
    shapes = dict.fromkeys(layers, (256, 256))
    losses = {
        n: {"int4_g128": 1.0 + i, "nvfp4": 0.5 + i / 2, "fp16": 0.0} for i, n in enumerate(layers)
    }
    table = SensitivityTable.from_mapping(losses, shapes)
    model = LatencyModel(bandwidth=1e9, efficiency={"nvfp4": 0.5, "int4_*": 1.0, "fp16": 1.0})
    problem = build_problem(table, cands, latency=model, unit="bytes")
    assert problem.unit == "bytes" and problem.seconds is not None
    size_only = solve_ilp(problem, "4.6bits")
    assert set(size_only.choice.values()) == {"nvfp4"}
    assert size_only.seconds is not None
    cap = 0.75 * size_only.seconds
    both = solve_ilp(problem, ["4.6bits", f"{cap}s"])
    assert both.seconds is not None and both.seconds <= cap and both.bits_per_weight <= 4.6
    assert "int4_g128" in both.choice.values()
    assert both.objective > size_only.objective
    points = sweep(problem, ["4.2bits", "4.6bits", "8bits"], also=[f"{cap}s"])
    assert all(p.seconds is not None and p.seconds <= cap for p in points)
    with pytest.raises(InfeasibleBudgetError, match="minimum achievable cost"):
        solve_ilp(problem, ["4.6bits", "1e-12s"])
