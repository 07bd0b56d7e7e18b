"""What ran on each layer: the steps passes record, and the plan they are written into.

A pass that changes a planned layer's weight records a *step* for it
(:func:`record_step`: ``awq``, ``gptq``, ``rtn``, ``lorc``...) and a rounding mode if
it is not round-to-nearest (:func:`record_rounding`). Steps live in
``ctx.records["steps"]`` (so they are checkpointed with the other records and survive a
resumed run); when the run ends :func:`apply_steps` writes them into the plan, so
``LayerPlan.method`` reads ``awq+gptq`` for a layer AWQ scaled and GPTQ rounded, or
``rtn`` where GPTQ fell back to round-to-nearest.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ptq.plan import QuantPlan

STEPS = "steps"
ROUNDING = "rounding"


def record_step(records: dict[str, Any], name: str, step: str) -> None:
    """Append ``step`` to layer ``name``'s steps (once: a rerun of a unit adds nothing)."""
    steps: list[str] = records.setdefault(STEPS, {}).setdefault(name, [])
    if step not in steps:
        steps.append(step)


def record_rounding(records: dict[str, Any], name: str, mode: str) -> None:
    """Layer ``name``'s codes were rounded with ``mode`` (``stochastic``)."""
    records.setdefault(ROUNDING, {})[name] = mode


def apply_steps(plan: QuantPlan, records: dict[str, Any]) -> None:
    """Write the recorded steps and rounding modes into ``plan`` (in place)."""
    steps: dict[str, list[str]] = records.get(STEPS, {})
    rounding: dict[str, str] = records.get(ROUNDING, {})
    for name, lp in list(plan.layers.items()):
        method = "+".join(steps[name]) if steps.get(name) else lp.method
        plan.layers[name] = replace(lp, method=method, rounding=rounding.get(name, lp.rounding))
