"""Pass protocol and Pipeline: every algorithm is a pass with a stated contract.

A pass has a frozen keyword-only config dataclass, ``requires`` (facts that earlier
passes must have established, e.g. ``"plan"``) and ``ensures`` (facts it establishes).
:class:`Pipeline` checks the contract before running each pass; a violation names the
passes that already ran. Instruments time each pass and report progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ptq.plan import QuantPlan

if TYPE_CHECKING:
    from ptq.calibration.distributed import DistributedContext

LOG = logging.getLogger("ptq")


@dataclass
class PassContext:
    """Run-wide context passed to every pass (no hidden global state).

    Attributes:
        seed: Seed for every RNG a pass uses.
        progress: Show progress bars.
        calibration: ``[n, seqlen]`` token ids (or None when no pass needs data).
        records: Per-pass results (e.g. per-layer errors) written to the output.
        facts: Facts established so far.
        history: Names of the passes that ran, in order.
        timings: Seconds per pass.
        distributed: This process's place in a ``torchrun`` job (None: one process).
            Block-wise passes then shard the calibration batches over the ranks and
            spread each stage's layers; other passes run whole on every rank.
    """

    seed: int = 0
    progress: bool = True
    calibration: torch.Tensor | None = None
    records: dict[str, Any] = field(default_factory=dict)
    facts: set[str] = field(default_factory=set)
    history: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    logger: logging.Logger = LOG
    distributed: DistributedContext | None = None

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)


@dataclass
class QuantState:
    """What passes transform: the model, its plan and the tokenizer."""

    model: nn.Module
    plan: QuantPlan
    tokenizer: Any = None


class PassContractError(RuntimeError):
    """A pass ran without what it requires."""


class Pass:
    """Base class. Subclasses set ``name``, ``Config``, ``requires``, ``ensures``, ``run``."""

    name: ClassVar[str] = "pass"
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = False

    def run(self, state: QuantState, ctx: PassContext) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement run()")

    def __repr__(self) -> str:
        cfg = getattr(self, "config", None)
        return f"{self.name}({cfg!r})" if cfg is not None else self.name


class Pipeline:
    """An ordered list of passes, run with contract checks and timing."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    @property
    def needs_calibration(self) -> bool:
        return any(p.needs_calibration for p in self.passes)

    def run(self, state: QuantState, ctx: PassContext) -> QuantState:
        ctx.facts.add("plan")
        for p in self.passes:
            missing = [r for r in p.requires if r not in ctx.facts]
            if missing:
                ran = ", ".join(ctx.history) or "none"
                raise PassContractError(
                    f"pass {p.name!r} requires {missing}, which no earlier pass ensured "
                    f"(passes run so far: {ran})"
                )
            start = time.perf_counter()
            p.run(state, ctx)
            ctx.timings[p.name] = ctx.timings.get(p.name, 0.0) + time.perf_counter() - start
            ctx.history.append(p.name)
            ctx.facts.update(p.ensures)
        return state

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(map(repr, self.passes))}])"
