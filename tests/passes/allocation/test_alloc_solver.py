"""The ILP's optimum equals brute force; greedy never beats it; constraints and errors."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from ptq.passes.allocation import (
    AllocationProblem,
    Candidate,
    InfeasibleBudgetError,
    LatencyModel,
    SensitivityTable,
    allowed_by_pattern,
    at_least_bits,
    build_problem,
    parse_candidates,
    solve_greedy,
    solve_ilp,
    sweep,
    uniform_allocations,
)
from ptq.passes.allocation import solver as solver_module
from ptq.passes.allocation.problem import _units


def random_problem(
    rng: np.random.Generator, n_layers: int, n_cands: int, *, tie: bool, restrict: bool
) -> AllocationProblem:
    """Random integer costs and real losses; optional ties and per-layer subsets."""
    layers = tuple(f"l{i}" for i in range(n_layers))
    cost = rng.integers(10, 1000, size=(n_layers, n_cands)).astype(np.float64)
    loss = rng.uniform(-0.1, 5.0, size=(n_layers, n_cands))
    allowed = np.ones((n_layers, n_cands), dtype=bool)
    if restrict:
        for i in rng.choice(n_layers, size=2, replace=False):
            allowed[i] = rng.random(n_cands) < 0.6
            allowed[i, rng.integers(n_cands)] = True
    tied: list[list[str]] = []
    if tie:
        members = rng.choice(n_layers, size=3, replace=False)
        if allowed[members].all(0).any():
            tied.append([layers[i] for i in members])
    return AllocationProblem(
        layers=layers,
        candidates=tuple(Candidate(f"c{j}", None) for j in range(n_cands)),
        loss=loss,
        nbytes=cost,
        cost=cost,
        unit="bytes",
        allowed=allowed,
        units=_units(layers, tied),
        shapes=tuple((8, 8) for _ in layers),
    )


def brute_force(problem: AllocationProblem, budget: float) -> float:
    """Least objective over every feasible assignment (math.inf if none)."""
    best = math.inf
    n_layers, n_cands = problem.loss.shape
    rows = np.arange(n_layers)
    for picks in itertools.product(range(n_cands), repeat=n_layers):
        p = np.array(picks)
        if not problem.allowed[rows, p].all():
            continue
        if any(len({picks[i] for i in u}) > 1 for u in problem.units):
            continue
        if problem.cost[rows, p].sum() <= budget:
            best = min(best, float(problem.loss[rows, p].sum()))
    return best


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("restrict", [False, True])
def test_ilp_matches_brute_force_and_greedy_never_beats_it(tie: bool, restrict: bool) -> None:
    rng = np.random.default_rng(1234 + 2 * tie + restrict)
    checked = 0
    for _ in range(20):
        n_layers, n_cands = int(rng.integers(4, 7)), int(rng.integers(3, 5))
        problem = random_problem(rng, n_layers, n_cands, tie=tie, restrict=restrict)
        lo, hi = problem.min_cost(), float(problem.cost.max(1).sum())
        budget = float(rng.uniform(lo, hi))
        best = brute_force(problem, budget)
        assert math.isfinite(best)
        alloc = solve_ilp(problem, budget)
        assert alloc.status == "optimal" and alloc.method == "ilp"
        assert alloc.cost <= budget
        assert alloc.objective == pytest.approx(best, abs=1e-6)
        picks = [problem.names.index(alloc.choice[name]) for name in problem.layers]
        assert all(problem.allowed[i, j] for i, j in enumerate(picks))
        for u in problem.units:
            assert len({picks[i] for i in u}) == 1
        greedy = solve_greedy(problem, budget)
        assert greedy.cost <= budget
        assert greedy.objective >= alloc.objective - 1e-9
        checked += 1
    assert checked == 20


def test_infeasible_budget_states_minimum() -> None:
    problem = random_problem(np.random.default_rng(0), 4, 3, tie=False, restrict=False)
    least = problem.min_cost()
    with pytest.raises(InfeasibleBudgetError, match=rf"minimum achievable cost is {least:.0f}"):
        solve_ilp(problem, least - 1)
    with pytest.raises(InfeasibleBudgetError):
        solve_greedy(problem, least - 1)
    # exactly at the minimum is feasible and takes every cheapest candidate
    assert solve_ilp(problem, least).cost == least


def _table() -> tuple[SensitivityTable, list[Candidate]]:
    cands = parse_candidates("int4_g128,int8_channel,fp16")
    layers = ["embed_proj", "q", "k", "v", "o", "head"]
    shapes = {name: (256, 256) for name in layers}
    # 4-bit hurts q much more than k/v; 8-bit nearly free; fp16 free
    d4 = {"embed_proj": 3.0, "q": 2.0, "k": 0.1, "v": 0.2, "o": 0.5, "head": 4.0}
    losses = {n: {"int4_g128": d4[n], "int8_channel": d4[n] / 50, "fp16": 0.0} for n in layers}
    return SensitivityTable.from_mapping(losses, shapes), cands


def test_bits_budget_ties_and_min_bits_policy() -> None:
    table, cands = _table()
    eight = at_least_bits(cands, 8)
    assert eight == {"int8_channel", "fp16"}
    problem = build_problem(
        table, cands, allowed={"embed_proj": eight, "head": eight}, tied=[["q", "k", "v"]]
    )
    # slack over the minimum (below) is 6 * (6.2 - 5.4375) = 4.575 bit-layers: enough to lift
    # "o" to INT8 (3.9375), not the tied q/k/v (3 * 3.9375), though q alone would gain more
    alloc = solve_ilp(problem, "6.2bits")
    assert alloc.bits_per_weight <= 6.2
    assert alloc.choice["embed_proj"] == alloc.choice["head"] == "int8_channel"
    assert alloc.choice["q"] == alloc.choice["k"] == alloc.choice["v"] == "int4_g128"
    assert alloc.choice["o"] == "int8_channel"
    assert alloc.total_bytes == alloc.cost  # a bytes problem
    untied = solve_ilp(build_problem(table, cands, allowed={"head": eight}), "6.2bits")
    assert untied.choice["q"] == "int8_channel" and untied.choice["o"] == "int4_g128"
    # first and last at 8 bits (8.0625 bits/weight each), q/k/v/o at 4.125: the cheapest
    assert problem.min_cost() * 8 / problem.n_weights == pytest.approx((2 * 8.0625 + 4 * 4.125) / 6)


def test_allowed_by_pattern_and_errors() -> None:
    table, cands = _table()
    allowed = allowed_by_pattern(table.layers, {"embed_.*|head": {"fp16"}, "head": {"fp16"}})
    assert allowed == {"embed_proj": {"fp16"}, "head": {"fp16"}}
    alloc = solve_ilp(build_problem(table, cands, allowed=allowed), "16bits")
    assert alloc.choice["head"] == "fp16" and alloc.objective == 0.0
    with pytest.raises(ValueError, match="matches no layer"):
        allowed_by_pattern(table.layers, {"mlp": {"fp16"}})
    with pytest.raises(ValueError, match="unknown layer"):
        build_problem(table, cands, allowed={"nope": {"fp16"}})
    with pytest.raises(ValueError, match="unknown layers"):
        build_problem(table, cands, tied=[["q", "zz"]])
    with pytest.raises(ValueError, match="no candidate allowed for all"):
        build_problem(table, cands, allowed={"q": {"fp16"}, "k": {"int4_g128"}}, tied=[["q", "k"]])
    with pytest.raises(ValueError, match="no sensitivities"):
        build_problem(table, parse_candidates("nvfp4"))


def test_candidate_that_does_not_fit_a_layer_is_excluded() -> None:
    cands = parse_candidates("int4_g128,int4_g64,fp16")
    losses = {"a": {"int4_g128": 1.0, "int4_g64": 0.9, "fp16": 0.0}}
    losses["b"] = dict(losses["a"])
    table = SensitivityTable.from_mapping(losses, {"a": (64, 576), "b": (64, 512)})
    problem = build_problem(table, cands)
    assert not problem.allowed[0, 0] and problem.allowed[1, 0]  # 128 does not divide 576
    alloc = solve_ilp(problem, problem.min_cost())
    assert alloc.choice == {"a": "int4_g64", "b": "int4_g128"}
    assert [u.choice["a"] for u in uniform_allocations(problem)] == ["int4_g64", "fp16"]
    with pytest.raises(ValueError, match=r"layer 'a'.*none of its allowed"):
        build_problem(table, cands, allowed={"a": {"int4_g128"}})


def test_sweep_is_monotone_and_latency_budget() -> None:
    table, cands = _table()
    problem = build_problem(table, cands)
    allocs = sweep(problem, ["3bits", "4.2bits", "6bits", "9bits", "17bits"], skip_infeasible=True)
    assert len(allocs) == 4  # 3 bits is below INT4 g128's 4.125
    objectives = [a.objective for a in allocs]
    assert objectives == sorted(objectives, reverse=True)
    assert allocs[-1].objective == 0.0
    with pytest.raises(InfeasibleBudgetError, match="bits/weight"):
        sweep(problem, ["3bits"])
    model = LatencyModel(bandwidth=1e9, efficiency={"int4_g128": 0.5})
    timed = build_problem(table, cands, latency=model)
    assert timed.unit == "seconds"
    # at half efficiency INT4 g128 is as slow as 8.25 bits/weight: INT8 wins everywhere
    alloc = solve_ilp(timed, f"{6 * 256 * 256 * 8.0625 / 8 / 1e9 * 1e3 * 1.0001}ms")
    assert set(alloc.choice.values()) == {"int8_channel"}
    # a size budget on a latency problem bounds its bytes (reported in bytes)
    sized = solve_ilp(timed, "6bits")
    assert sized.unit == "bytes" and sized.bits_per_weight <= 6
    assert sized.seconds == pytest.approx(
        sum(timed.seconds[i, timed.names.index(c)] for i, c in enumerate(sized.choice.values()))
    )
    with pytest.raises(ValueError, match="needs a latency model"):
        solve_ilp(problem, "1ms")


def test_greedy_never_beats_ilp_on_larger_instances() -> None:
    rng = np.random.default_rng(99)
    for _ in range(5):
        problem = random_problem(rng, 40, 6, tie=True, restrict=True)
        budget = float(rng.uniform(problem.min_cost(), problem.cost.max(1).sum()))
        ilp, greedy = solve_ilp(problem, budget), solve_greedy(problem, budget)
        assert ilp.cost <= budget and greedy.cost <= budget
        assert greedy.objective >= ilp.objective - 1e-9


def test_overshoot_from_solver_tolerance_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """HiGHS may return a row violated within its tolerance: the budget is tightened."""
    problem = random_problem(np.random.default_rng(5), 5, 3, tie=False, restrict=False)
    # the dearest allocation overshoots this budget by 1e-10 (relative): within tolerance
    budget = float(problem.cost.max(1).sum()) * (1 - 1e-10)
    real_milp = solver_module.milp
    calls: list[float] = []

    def sloppy_milp(c: np.ndarray, **kwargs: Any) -> Any:
        res = real_milp(c, **kwargs)
        calls.append(float(kwargs["constraints"].ub[-1]))
        if len(calls) == 1:  # first answer: every unit at its dearest candidate (over budget)
            weights = kwargs["constraints"].A.toarray()
            x = np.zeros_like(res.x)
            for row in weights[:-1]:
                cols = np.flatnonzero(row)
                x[cols[np.argmax(weights[-1, cols])]] = 1.0
            res.x = x
        return res

    monkeypatch.setattr(solver_module, "milp", sloppy_milp)
    alloc = solve_ilp(problem, budget)
    assert len(calls) == 2 and calls[0] == 1.0 and calls[1] < 1.0
    assert alloc.status == "optimal_tightened" and alloc.cost <= budget
    assert alloc.objective == pytest.approx(brute_force(problem, budget * calls[1]), abs=1e-6)
