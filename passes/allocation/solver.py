"""Solve bit allocation exactly as a 0/1 integer program, or greedily for comparison.

The integer program of Hubara et al., "Improving Post Training Neural Quantization:
Layer-wise Calibration and Integer Programming" (2020), eq. 7, over decision units ``u``
(a layer, or a tied group of layers sharing one candidate):

    minimise    sum_{u,c} y[u, c] * dL[u, c]
    subject to  sum_c y[u, c] = 1                   for every unit u
                sum_{u,c} y[u, c] * cost_k[u, c] <= B_k  for every budget k
                y[u, c] = 0                         where c is not allowed for u
                y[u, c] in {0, 1}

with one budget row per budget given (bytes, and/or modelled seconds: a size and a
latency budget together make a two-dimensional knapsack), solved with
``scipy.optimize.milp`` (HiGHS branch and bound, relative gap 0) on sparse constraint
matrices; only allowed pairs get a variable.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array, vstack

from ptq.errors import PtqUsageError
from ptq.passes.allocation.budget import Budget, CostUnit, as_budget
from ptq.passes.allocation.problem import AllocationProblem

Method = Literal["ilp", "greedy"]

_STATUS = {0: "optimal", 1: "limit_reached", 2: "infeasible", 3: "unbounded", 4: "error"}


class InfeasibleBudgetError(PtqUsageError, ValueError):
    """The budget is below the cheapest allocation the constraints permit (a usage error:
    the CLI prints it without a traceback)."""


@dataclass(frozen=True)
class Allocation:
    """A solved allocation.

    Attributes:
        choice: Layer name -> candidate name, in model order.
        cost: Total cost in ``unit`` (bytes or seconds).
        unit: ``bytes`` or ``seconds``.
        budget: The budget it was solved for (same unit).
        objective: Predicted loss increase ``sum dL`` of the choice.
        total_bytes: Exact storage of all the layers' weights.
        bits_per_weight: ``8 * total_bytes / n_weights``.
        status: Solver status (``optimal``, ``limit_reached``, ``heuristic``, ``uniform``).
        method: ``ilp``, ``greedy`` or ``uniform``.
        seconds: Modelled latency of the choice (None without a latency model).
        budgets: Every ``(unit, bound)`` it was solved under (the first is ``budget``).
    """

    choice: Mapping[str, str] = field(hash=False)
    cost: float
    unit: str
    budget: float
    objective: float
    total_bytes: int
    bits_per_weight: float
    status: str
    method: str
    seconds: float | None = None
    budgets: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, object]:
        """JSON-ready summary (``choice`` is the layer -> candidate-name scheme map)."""
        return {
            "choice": dict(self.choice),
            "cost": self.cost,
            "unit": self.unit,
            "budget": self.budget,
            "objective": self.objective,
            "total_bytes": self.total_bytes,
            "bits_per_weight": self.bits_per_weight,
            "status": self.status,
            "method": self.method,
            "seconds": self.seconds,
            "budgets": [list(b) for b in self.budgets],
        }


BudgetLike = Budget | str | float
Budgets = BudgetLike | Sequence[BudgetLike]


@dataclass(frozen=True)
class _Limit:
    """One budget row: ``sum cost[l, pick_l] <= bound`` in ``unit``."""

    unit: CostUnit
    bound: float
    cost: np.ndarray  # [L, C]


def resolve_budget(problem: AllocationProblem, budget: BudgetLike) -> float:
    """The budget in the problem's cost unit (numbers are taken as already in it)."""
    b = as_budget(budget)
    return b.resolve(problem.unit, problem.n_weights) if isinstance(b, Budget) else float(b)


def _limits(problem: AllocationProblem, budgets: Budgets) -> list[_Limit]:
    """One :class:`_Limit` per budget: bits/bytes constrain ``nbytes``, times constrain
    ``seconds``, bare numbers the problem's own ``cost``."""
    items = [budgets] if isinstance(budgets, str | int | float | Budget) else list(budgets)
    if not items:
        raise ValueError("give at least one budget")
    out: list[_Limit] = []
    for item in items:
        b = as_budget(item)
        if isinstance(b, Budget):
            unit: CostUnit = "seconds" if b.kind == "seconds" else "bytes"
            out.append(_Limit(unit, b.resolve(unit, problem.n_weights), problem.cost_in(unit)))
        else:
            out.append(_Limit(problem.unit, float(b), problem.cost))
    return out


def _check_feasible(problem: AllocationProblem, limits: Sequence[_Limit]) -> None:
    for lim in limits:
        least = problem.min_cost(lim.unit)
        if least > lim.bound:
            raise InfeasibleBudgetError(
                f"budget {_fmt(lim.bound, lim.unit, problem)} is infeasible: the minimum "
                f"achievable cost is {_fmt(least, lim.unit, problem)} (every layer at its "
                f"cheapest allowed candidate); raise the budget or allow cheaper candidates"
            )


def _fmt(value: float, unit: CostUnit, problem: AllocationProblem) -> str:
    if unit == "seconds":
        return f"{value * 1e3:.6g} ms"
    return f"{value:.0f} bytes ({8 * value / problem.n_weights:.4g} bits/weight)"


def _joint_infeasible(problem: AllocationProblem, limits: Sequence[_Limit]) -> str:
    return (
        "no allocation meets all the budgets together ("
        + ", ".join(_fmt(lim.bound, lim.unit, problem) for lim in limits)
        + "), though each alone is feasible; relax one of them"
    )


def make_allocation(
    problem: AllocationProblem,
    picks: np.ndarray,
    budget: float,
    status: str,
    method: str,
    *,
    unit: CostUnit | None = None,
    budgets: tuple[tuple[str, float], ...] = (),
) -> Allocation:
    """Wrap per-layer candidate indices ``picks`` [L] into an :class:`Allocation`.

    ``unit`` (default: the problem's) is the unit of ``budget`` and of the reported
    ``cost``; ``budgets`` lists every ``(unit, bound)`` the allocation was solved under.
    """
    unit = problem.unit if unit is None else unit
    rows = np.arange(len(problem.layers))
    total_bytes = int(problem.nbytes[rows, picks].sum())
    seconds = None if problem.seconds is None else float(problem.seconds[rows, picks].sum())
    return Allocation(
        choice={
            layer: problem.candidates[j].name
            for layer, j in zip(problem.layers, picks, strict=True)
        },
        cost=float(problem.cost_in(unit)[rows, picks].sum()),
        unit=unit,
        budget=budget,
        objective=float(problem.loss[rows, picks].sum()),
        total_bytes=total_bytes,
        bits_per_weight=8 * total_bytes / problem.n_weights,
        status=status,
        method=method,
        seconds=seconds,
        budgets=budgets or ((unit, budget),),
    )


def _wrap(
    problem: AllocationProblem,
    picks: np.ndarray,
    limits: Sequence[_Limit],
    status: str,
    method: str,
) -> Allocation:
    first = limits[0]
    return make_allocation(
        problem,
        picks,
        first.bound,
        status,
        method,
        unit=first.unit,
        budgets=tuple((lim.unit, lim.bound) for lim in limits),
    )


def _layer_picks(problem: AllocationProblem, unit_picks: np.ndarray) -> np.ndarray:
    picks = np.empty(len(problem.layers), dtype=np.int64)
    for u, j in zip(problem.units, unit_picks, strict=True):
        picks[list(u)] = j
    return picks


def solve_ilp(
    problem: AllocationProblem,
    budget: Budgets,
    *,
    time_limit: float | None = None,
) -> Allocation:
    """Optimal allocation within ``budget`` (see the module docstring for the program).

    ``budget`` may be a list: every budget is one row of the program, e.g.
    ``["4.5bits", "0.05ms"]`` bounds the size and the modelled latency together (a
    two-dimensional knapsack, which a greedy marginal-ratio rule cannot solve exactly).

    Losses are shifted per unit and costs divided by their budget before solving so that
    HiGHS's absolute tolerances are relative ones; the reported objective and cost are
    recomputed exactly. HiGHS accepts rows violated by its feasibility tolerance (about
    1e-9 relative was seen on 560 layers); if the solution overshoots a budget, that
    budget row is tightened by a margin (the overshoot, then tenfold each retry) and the
    program re-solved; the status then reads ``optimal_tightened``: optimal for
    ``budget * (1 - margin)``, never over ``budget``.

    Raises:
        InfeasibleBudgetError: a budget is below the minimum achievable cost, or no
            allocation meets all the budgets together.
        RuntimeError: HiGHS failed without a feasible solution.
    """
    limits = _limits(problem, budget)
    _check_feasible(problem, limits)
    loss, _, ok = problem.unit_matrices()
    ui, cj = np.nonzero(ok)
    n_units, n_vars = len(problem.units), len(ui)
    shifted = loss - np.where(ok, loss, np.inf).min(axis=1, keepdims=True)
    obj = shifted[ui, cj]
    obj = obj / max(float(np.abs(obj).max()), 1e-300)
    one_each = coo_array((np.ones(n_vars), (ui, np.arange(n_vars))), shape=(n_units, n_vars))
    weights = np.stack([problem.per_unit(lim.cost)[ui, cj] / lim.bound for lim in limits])
    rows = np.repeat(np.arange(len(limits)), n_vars)
    cols = np.tile(np.arange(n_vars), len(limits))
    budget_rows = coo_array((weights.ravel(), (rows, cols)), shape=(len(limits), n_vars))
    a = vstack([one_each, budget_rows]).tocsr()
    margin = np.zeros(len(limits))
    options: dict[str, float | bool] = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = time_limit
    for _ in range(8):
        lower = np.concatenate([np.ones(n_units), np.full(len(limits), -np.inf)])
        upper = np.concatenate([np.ones(n_units), 1.0 - margin])
        with _native_stdout_silenced():
            res = milp(
                obj,
                constraints=LinearConstraint(a, lower, upper),
                integrality=np.ones(n_vars),
                bounds=Bounds(0, 1),
                options=options,
            )
        if res.x is None:
            status = _STATUS.get(res.status, "error")
            if status == "infeasible":
                raise InfeasibleBudgetError(_joint_infeasible(problem, limits))
            raise RuntimeError(f"HiGHS found no allocation (status {status}): {res.message}")
        chosen = np.round(res.x) > 0.5
        if not np.array_equal(np.bincount(ui[chosen], minlength=n_units), np.ones(n_units)):
            raise RuntimeError(f"HiGHS returned a non-integral allocation: {res.message}")
        unit_picks = np.empty(n_units, dtype=np.int64)
        unit_picks[ui[chosen]] = cj[chosen]
        over = weights[:, chosen].sum(axis=1) - 1.0
        if (over <= 1e-12).all():
            status = _STATUS[res.status] + ("_tightened" if margin.any() else "")
            return _wrap(problem, _layer_picks(problem, unit_picks), limits, status, "ilp")
        bad = over > 1e-12
        margin[bad] = np.maximum(np.maximum(10 * margin[bad], over[bad]), 1e-9)
    raise RuntimeError("HiGHS kept returning allocations over the budget (numerical trouble)")


def solve_greedy(problem: AllocationProblem, budget: Budgets) -> Allocation:
    """Greedy baseline: start every unit at its cheapest candidate, then repeatedly make
    the move with the best loss reduction per extra cost (``-dL / dC``; free moves that
    lower the loss first) that stays within the budget, until no move improves.

    With several budgets ``B_k`` (a multi-dimensional knapsack) a move must keep every
    budget and its cost is a weighted sum ``dC = sum_k w_k dC_k / B_k``, with equal
    weights, weights proportional to each budget's current use (the scarcer resource
    costs more; after Toyoda, "A simplified algorithm for obtaining approximate solutions
    to zero-one programming problems", 1975), or all weight on one budget (the others
    only as limits). Starts: each unit's cheapest candidate by the equal-weight sum and
    by each single cost. The best result over starts and rules is returned: a
    deliberately strong baseline.

    Terminates because each move strictly lowers the objective. Never better than
    :func:`solve_ilp`, often close on smooth single-budget trade-offs; used to check the
    ILP's value.

    Raises:
        InfeasibleBudgetError: a budget is below the minimum achievable cost, or every
            greedy start already breaks one of several budgets.
    """
    limits = _limits(problem, budget)
    _check_feasible(problem, limits)
    loss, _, ok = problem.unit_matrices()
    loss = np.where(ok, loss, np.inf)
    costs = [np.where(ok, problem.per_unit(lim.cost), np.inf) / lim.bound for lim in limits]
    rows = np.arange(len(problem.units))
    starts = [_cheapest(loss, m) for m in (sum(costs, np.zeros_like(loss)), *costs)]
    feasible = [p for p in starts if all(float(c[rows, p].sum()) <= 1.0 for c in costs)]
    feasible = list({tuple(p): p for p in feasible}.values())  # one climb per distinct start
    if not feasible:
        raise InfeasibleBudgetError(
            "greedy start (every unit at its cheapest candidate by the normalised cost "
            "sum, or by any one cost) breaks a budget; " + _joint_infeasible(problem, limits)
        )
    n = len(costs)
    rules: list[np.ndarray | None] = [np.ones(n)]
    if n > 1:
        rules += [None, *np.eye(n)]  # None: by current use
    results = [_climb(loss, costs, ok, p.copy(), w) for p in feasible for w in rules]
    picks = min(results, key=lambda p: float(loss[rows, p].sum()))
    return _wrap(problem, _layer_picks(problem, picks), limits, "heuristic", "greedy")


def _climb(
    loss: np.ndarray,
    costs: list[np.ndarray],
    ok: np.ndarray,
    picks: np.ndarray,
    weights: np.ndarray | None,
) -> np.ndarray:
    """Greedy moves from ``picks`` under normalised costs (each budget is 1), pricing a
    move by ``weights`` over the budgets (None: by each budget's current use)."""
    rows = np.arange(len(picks))
    while True:
        d_loss = np.where(ok, loss - loss[rows, picks][:, None], 0.0)
        valid = ok & (d_loss < 0)
        spent = [float(c[rows, picks].sum()) for c in costs]
        deltas = [np.where(ok, c - c[rows, picks][:, None], np.inf) for c in costs]
        for sp, d in zip(spent, deltas, strict=True):
            valid &= sp + d <= 1.0
        if not valid.any():
            return picks
        w = weights if weights is not None else np.array(spent)
        if not w.any():
            w = np.ones(len(costs))
        d_comb = sum((wk * np.where(valid, d, 0.0) for wk, d in zip(w, deltas, strict=True)))
        d_comb = np.where(valid, d_comb, 1.0)
        free = valid & (d_comb <= 0)
        if free.any():
            score = np.where(free, -d_loss, -np.inf)
        else:
            score = np.where(valid, -d_loss / d_comb, -np.inf)
        u, j = np.unravel_index(int(np.argmax(score)), score.shape)
        picks[u] = j


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Point file descriptor 1 at the null device while HiGHS runs: some HiGHS builds
    print debug lines (``HighsMipSolverData::...``) from C++ even with ``disp=False``.
    Python-level output is flushed first; where fd 1 cannot be duplicated, nothing
    changes."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _cheapest(loss: np.ndarray, cost: np.ndarray) -> np.ndarray:
    best = cost.min(axis=1, keepdims=True)
    return np.where(cost == best, loss, np.inf).argmin(axis=1)


def sweep(
    problem: AllocationProblem,
    budgets: Iterable[BudgetLike],
    *,
    method: Method = "ilp",
    skip_infeasible: bool = False,
    also: Sequence[BudgetLike] = (),
) -> list[Allocation]:
    """Solve for each budget (a Pareto sweep of loss against cost).

    Args:
        problem: The allocation problem.
        budgets: Budgets (strings like ``"4.5bits"``, :class:`Budget`, or cost units).
        method: ``ilp`` (exact) or ``greedy``.
        skip_infeasible: Leave out budgets below the minimum cost instead of raising.
        also: Budgets every point must meet too (e.g. a latency cap ``"0.05ms"``).
    """
    solve = solve_ilp if method == "ilp" else solve_greedy
    out: list[Allocation] = []
    for budget in budgets:
        try:
            out.append(solve(problem, [budget, *also]))
        except InfeasibleBudgetError:
            if not skip_infeasible:
                raise
    return out


def uniform_allocations(problem: AllocationProblem) -> list[Allocation]:
    """Every layer at the same candidate, for each candidate that fits every layer and
    has every loss measured (allowed-subset and tie policy is ignored: these are the
    uniform baselines a mixed allocation is compared with)."""
    out: list[Allocation] = []
    for j in range(len(problem.candidates)):
        if np.isnan(problem.nbytes[:, j]).any() or np.isnan(problem.loss[:, j]).any():
            continue
        picks = np.full(len(problem.layers), j, dtype=np.int64)
        out.append(make_allocation(problem, picks, float("nan"), "uniform", "uniform"))
    return out
