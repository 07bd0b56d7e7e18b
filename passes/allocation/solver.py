"""Solve bit allocation exactly as a 0/1 integer program, or greedily for comparison.

The integer program of Hubara et al., "Improving Post Training Neural Quantization:
Layer-wise Calibration and Integer Programming" (2020), eq. 7, over decision units ``u``
(a layer, or a tied group of layers sharing one candidate):

    minimise    sum_{u,c} y[u, c] * dL[u, c]
    subject to  sum_c y[u, c] = 1                   for every unit u
                sum_{u,c} y[u, c] * cost[u, c] <= B
                y[u, c] = 0                         where c is not allowed for u
                y[u, c] in {0, 1}

solved with ``scipy.optimize.milp`` (HiGHS branch and bound, relative gap 0) on sparse
constraint matrices; only allowed pairs get a variable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array, vstack

from ptq.passes.allocation.budget import Budget, as_budget
from ptq.passes.allocation.problem import AllocationProblem

Method = Literal["ilp", "greedy"]

_STATUS = {0: "optimal", 1: "limit_reached", 2: "infeasible", 3: "unbounded", 4: "error"}


class InfeasibleBudgetError(ValueError):
    """The budget is below the cheapest allocation the constraints permit."""


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
        }


def resolve_budget(problem: AllocationProblem, budget: Budget | str | float) -> float:
    """The budget in the problem's cost unit (numbers are taken as already in it)."""
    b = as_budget(budget)
    return b.resolve(problem.unit, problem.n_weights) if isinstance(b, Budget) else float(b)


def _check_feasible(problem: AllocationProblem, budget: float) -> None:
    least = problem.min_cost()
    if least > budget:
        raise InfeasibleBudgetError(
            f"budget {_fmt(budget, problem)} is infeasible: the minimum achievable cost is "
            f"{_fmt(least, problem)} (every layer at its cheapest allowed candidate); "
            f"raise the budget or allow cheaper candidates"
        )


def _fmt(value: float, problem: AllocationProblem) -> str:
    if problem.unit == "seconds":
        return f"{value * 1e3:.6g} ms"
    return f"{value:.0f} bytes ({8 * value / problem.n_weights:.4g} bits/weight)"


def make_allocation(
    problem: AllocationProblem,
    picks: np.ndarray,
    budget: float,
    status: str,
    method: str,
) -> Allocation:
    """Wrap per-layer candidate indices ``picks`` [L] into an :class:`Allocation`."""
    rows = np.arange(len(problem.layers))
    total_bytes = int(problem.nbytes[rows, picks].sum())
    return Allocation(
        choice={
            layer: problem.candidates[j].name
            for layer, j in zip(problem.layers, picks, strict=True)
        },
        cost=float(problem.cost[rows, picks].sum()),
        unit=problem.unit,
        budget=budget,
        objective=float(problem.loss[rows, picks].sum()),
        total_bytes=total_bytes,
        bits_per_weight=8 * total_bytes / problem.n_weights,
        status=status,
        method=method,
    )


def _layer_picks(problem: AllocationProblem, unit_picks: np.ndarray) -> np.ndarray:
    picks = np.empty(len(problem.layers), dtype=np.int64)
    for u, j in zip(problem.units, unit_picks, strict=True):
        picks[list(u)] = j
    return picks


def solve_ilp(
    problem: AllocationProblem,
    budget: Budget | str | float,
    *,
    time_limit: float | None = None,
) -> Allocation:
    """Optimal allocation within ``budget`` (see the module docstring for the program).

    Losses are shifted per unit and costs divided by the budget before solving so that
    HiGHS's absolute tolerances are relative ones; the reported objective and cost are
    recomputed exactly. HiGHS accepts rows violated by its feasibility tolerance (about
    1e-9 relative was seen on 560 layers); if the solution overshoots the budget, the
    budget row is tightened by a margin (the overshoot, then tenfold each retry) and the
    program re-solved; the status then reads ``optimal_tightened``: optimal for
    ``budget * (1 - margin)``, never over ``budget``.

    Raises:
        InfeasibleBudgetError: the budget is below the minimum achievable cost.
        RuntimeError: HiGHS failed without a feasible solution.
    """
    b = resolve_budget(problem, budget)
    _check_feasible(problem, b)
    loss, cost, ok = problem.unit_matrices()
    ui, cj = np.nonzero(ok)
    n_units, n_vars = len(problem.units), len(ui)
    shifted = loss - np.where(ok, loss, np.inf).min(axis=1, keepdims=True)
    obj = shifted[ui, cj]
    obj = obj / max(float(np.abs(obj).max()), 1e-300)
    one_each = coo_array((np.ones(n_vars), (ui, np.arange(n_vars))), shape=(n_units, n_vars))
    weights = cost[ui, cj] / b
    budget_row = coo_array(
        (weights, (np.zeros(n_vars, dtype=np.int64), np.arange(n_vars))), shape=(1, n_vars)
    )
    a = vstack([one_each, budget_row]).tocsr()
    margin = 0.0
    options: dict[str, float | bool] = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = time_limit
    for _ in range(8):
        lower = np.append(np.ones(n_units), -np.inf)
        upper = np.append(np.ones(n_units), 1.0 - margin)
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
                _check_feasible(problem, b)
            raise RuntimeError(f"HiGHS found no allocation (status {status}): {res.message}")
        chosen = np.round(res.x) > 0.5
        if not np.array_equal(np.bincount(ui[chosen], minlength=n_units), np.ones(n_units)):
            raise RuntimeError(f"HiGHS returned a non-integral allocation: {res.message}")
        unit_picks = np.empty(n_units, dtype=np.int64)
        unit_picks[ui[chosen]] = cj[chosen]
        over = float(weights[chosen].sum()) - 1.0
        if over <= 1e-12:
            status = _STATUS[res.status] + ("_tightened" if margin else "")
            return make_allocation(problem, _layer_picks(problem, unit_picks), b, status, "ilp")
        margin = max(10 * margin, over, 1e-9)
    raise RuntimeError("HiGHS kept returning allocations over the budget (numerical trouble)")


def solve_greedy(problem: AllocationProblem, budget: Budget | str | float) -> Allocation:
    """Greedy baseline: start every unit at its cheapest candidate, then repeatedly make
    the move with the best loss reduction per extra cost (``-dL / dC``; free moves that
    lower the loss first) that stays within the budget, until no move improves.

    Terminates because each move strictly lowers the objective. Never better than
    :func:`solve_ilp`, often close on smooth trade-offs; used to check the ILP's value.
    """
    b = resolve_budget(problem, budget)
    _check_feasible(problem, b)
    loss, cost, ok = problem.unit_matrices()
    loss = np.where(ok, loss, np.inf)
    cost = np.where(ok, cost, np.inf)
    rows = np.arange(len(problem.units))
    picks = _cheapest(loss, cost)
    while True:
        spent = float(cost[rows, picks].sum())
        d_loss = np.where(ok, loss - loss[rows, picks][:, None], 0.0)
        d_cost = np.where(ok, cost - cost[rows, picks][:, None], np.inf)
        valid = ok & (d_loss < 0) & (spent + d_cost <= b)
        if not valid.any():
            break
        free = valid & (d_cost <= 0)
        if free.any():
            score = np.where(free, -d_loss, -np.inf)
        else:
            score = np.where(valid, -d_loss / np.where(valid, d_cost, 1.0), -np.inf)
        u, j = np.unravel_index(int(np.argmax(score)), score.shape)
        picks[u] = j
    return make_allocation(problem, _layer_picks(problem, picks), b, "heuristic", "greedy")


def _cheapest(loss: np.ndarray, cost: np.ndarray) -> np.ndarray:
    best = cost.min(axis=1, keepdims=True)
    return np.where(cost == best, loss, np.inf).argmin(axis=1)


def sweep(
    problem: AllocationProblem,
    budgets: Iterable[Budget | str | float],
    *,
    method: Method = "ilp",
    skip_infeasible: bool = False,
) -> list[Allocation]:
    """Solve for each budget (a Pareto sweep of loss against cost).

    Args:
        problem: The allocation problem.
        budgets: Budgets (strings like ``"4.5bits"``, :class:`Budget`, or cost units).
        method: ``ilp`` (exact) or ``greedy``.
        skip_infeasible: Leave out budgets below the minimum cost instead of raising.
    """
    solve = solve_ilp if method == "ilp" else solve_greedy
    out: list[Allocation] = []
    for budget in budgets:
        try:
            out.append(solve(problem, budget))
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
