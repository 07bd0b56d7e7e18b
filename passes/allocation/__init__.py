"""Mixed-precision bit allocation by integer programming (Hubara et al., 2020).

Measure ``dL[layer, candidate]`` once into a :class:`SensitivityTable`, build an
:class:`AllocationProblem` with the candidates' exact byte (or latency) costs and any
constraints, then :func:`solve_ilp` for a budget such as ``"4.5bits"`` or ``"70MB"``.
The resulting :class:`Allocation` maps each layer to a candidate name.

The solver (SciPy's HiGHS) and the report (matplotlib) are imported on first use, so
importing this package (as ``ptq quantize`` does for its ``--budget`` options) stays
cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from ptq.passes.allocation.budget import Budget, parse_budget
from ptq.passes.allocation.candidates import (
    Candidate,
    LatencyModel,
    candidate_bytes,
    tensor_bytes,
)
from ptq.passes.allocation.problem import (
    AllocationProblem,
    allowed_by_pattern,
    at_least_bits,
    build_problem,
)
from ptq.passes.allocation.registry import default_format, parse_candidate, parse_candidates
from ptq.passes.allocation.sensitivity import SensitivityTable

_LAZY = {
    "ReportFiles": "report",
    "write_report": "report",
    "Allocation": "solver",
    "InfeasibleBudgetError": "solver",
    "resolve_budget": "solver",
    "solve_greedy": "solver",
    "solve_ilp": "solver",
    "sweep": "solver",
    "uniform_allocations": "solver",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"ptq.passes.allocation.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'ptq.passes.allocation' has no attribute {name!r}")


__all__ = [
    "Allocation",
    "AllocationProblem",
    "Budget",
    "Candidate",
    "InfeasibleBudgetError",
    "LatencyModel",
    "ReportFiles",
    "SensitivityTable",
    "allowed_by_pattern",
    "at_least_bits",
    "build_problem",
    "candidate_bytes",
    "default_format",
    "parse_budget",
    "parse_candidate",
    "parse_candidates",
    "resolve_budget",
    "solve_greedy",
    "solve_ilp",
    "sweep",
    "tensor_bytes",
    "uniform_allocations",
    "write_report",
]
