"""Pass protocol and Pipeline: every algorithm is a pass with a stated contract.

A pass has a frozen keyword-only config dataclass, ``requires`` (facts that earlier
passes must have established, e.g. ``"plan"``) and ``ensures`` (facts it establishes).
:class:`Pipeline` checks the contract for the whole list before anything runs; a
violation names the passes before the offending one.

Every pass sees the model through the block-wise runner (:mod:`ptq.calibration.runner`),
one *unit* at a time: each decoder block in turn, then the outer part (head, final
norm); a model without repeated blocks is one unit. A pass implements:

* :meth:`Pass.run_unit` (required, or :meth:`Pass.run` for a simple per-layer pass):
  called for every unit with ``state.unit`` set (its layers, its calibration stream,
  how to run it);
* optionally :meth:`Pass.prepare` (once, before any weight is loaded: the model may be
  a skeleton on the ``meta`` device) and :meth:`Pass.prologue` (once, with the outer
  weights loaded, before block 0's inputs are computed).

A pass written as ``run(state, ctx)`` alone (a custom pass) is called once per unit
with ``state.plan`` holding only that unit's layers, so a per-layer loop over
``state.plan`` works unchanged; calling ``run`` on a whole model runs the pipeline of
that one pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ptq.plan import QuantPlan

if TYPE_CHECKING:
    from ptq.calibration.distributed import DistributedContext
    from ptq.calibration.units import Unit
    from ptq.models.weight_source import WeightSource

LOG = logging.getLogger("ptq")
CALIBRATION_BATCH = 8


@dataclass
class PassContext:
    """Run-wide context passed to every pass (no hidden global state).

    Attributes:
        seed: Seed for every RNG a pass uses.
        progress: Show progress bars.
        calibration: ``[n, seqlen]`` token ids or a list of model-input dicts (None when
            no pass needs data).
        batch_size: Calibration sequences per forward.
        device: Where the current unit and its activations live.
        records: Per-pass results (e.g. per-layer errors) written to the output.
        facts: Facts established so far.
        history: Names of the passes that ran, in order.
        timings: Seconds per pass.
        distributed: This process's place in a ``torchrun`` job (None: one process).
            Block-wise weight passes then shard the calibration batches over the ranks
            and spread each stage's layers; other passes run whole on every rank.
        status: A short line a pass sets to show progress (the last layer's error).
    """

    seed: int = 0
    progress: bool = True
    calibration: torch.Tensor | Sequence[Any] | None = None
    batch_size: int = CALIBRATION_BATCH
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    records: dict[str, Any] = field(default_factory=dict)
    facts: set[str] = field(default_factory=set)
    history: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    logger: logging.Logger = LOG
    distributed: DistributedContext | None = None
    status: str = ""

    def generator(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)


@dataclass
class QuantState:
    """What passes transform: the model, its plan and the tokenizer.

    ``unit`` is the runner's current unit while a pass's :meth:`Pass.run_unit` runs.
    """

    model: nn.Module
    plan: QuantPlan
    tokenizer: Any = None
    unit: Unit | None = None

    def for_unit(self) -> QuantState:
        """This state with ``plan`` restricted to the current unit's layers."""
        assert self.unit is not None
        names = set(self.unit.layers)
        sub = replace(self.plan, layers={n: lp for n, lp in self.plan.layers.items() if n in names})
        return replace(self, plan=sub)


class PassContractError(ValueError):
    """A pass would run without what it requires, or after what it must precede."""


class Pass:
    """Base class. Subclasses set ``name``, ``Config``, ``requires``, ``ensures`` and
    implement :meth:`run_unit` (or :meth:`run`, see the module docstring).

    Class attributes:
        needs_calibration: Needs calibration data.
        observes_fp: Observes the floating-point model's activations block by block
            (the runner then keeps the FP stream; see ``Unit.run_fp``).
        touches_outer: Has work on the outer unit even where no planned layer is there
            (rotation rotates the head).
        before_weights: Transforms the FP model, so must come before every pass that
            ensures ``weights_quantized`` (rotation, SmoothQuant, bit allocation).
        decides: Decides for the whole model at once between two sweeps of the runner
            (:meth:`decide`; bit allocation), instead of working unit by unit.
    """

    name: ClassVar[str] = "pass"
    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = False
    observes_fp: ClassVar[bool] = False
    touches_outer: ClassVar[bool] = False
    before_weights: ClassVar[bool] = False
    decides: ClassVar[bool] = False

    def prepare(self, state: QuantState, ctx: PassContext) -> None:
        """Once, before any weight is loaded (``state.model`` may be a meta skeleton).

        The default prepares the :meth:`inner_passes`."""
        for p in self.inner_passes():
            p.prepare(state, ctx)

    def prologue(self, state: QuantState, ctx: PassContext) -> None:
        """Once, with the outer weights loaded, before block 0's inputs are computed.

        The default runs the :meth:`inner_passes`' prologues."""
        for p in self.inner_passes():
            p.prologue(state, ctx)

    def prologue_modules(self, state: QuantState) -> list[str]:
        """Outer modules :meth:`prologue` changes; the runner loads them before it runs
        (a lazily read model otherwise loads only the input embeddings before block 0)."""
        return [m for p in self.inner_passes() for m in p.prologue_modules(state)]

    @property
    def has_prologue(self) -> bool:
        """Whether :meth:`prologue` does anything (the runner then keeps outer changes)."""
        return type(self).prologue is not Pass.prologue or any(
            p.has_prologue for p in self.inner_passes()
        )

    def decide(self, source: WeightSource, state: QuantState, ctx: PassContext) -> None:
        """For ``decides`` passes: decide from the whole model, read block by block from
        ``source`` (after the passes before this one transformed it)."""
        raise NotImplementedError(f"{type(self).__name__} does not decide for the whole model")

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        """Work on ``state.unit``. Default: :meth:`run` on the unit's slice of the plan."""
        if type(self).run is Pass.run:
            raise NotImplementedError(f"{type(self).__name__} must implement run_unit() or run()")
        self.run(state.for_unit(), ctx)

    def run(self, state: QuantState, ctx: PassContext) -> None:
        """Run this pass alone over a whole in-memory model (``Pipeline([self])``)."""
        if type(self).run_unit is Pass.run_unit and not self.decides:
            raise NotImplementedError(f"{type(self).__name__} must implement run_unit() or run()")
        Pipeline([self]).run(state, ctx)

    def inner_passes(self) -> list[Pass]:
        """Passes this one runs inside its own (wrappers such as LoRC)."""
        return []

    def __repr__(self) -> str:
        cfg = getattr(self, "config", None)
        return f"{self.name}({cfg!r})" if cfg is not None else self.name


def check_contract(passes: Sequence[Pass], facts: set[str], history: list[str]) -> None:
    """Walk the passes in order, checking each one's ``requires`` against the facts so far.

    Raises:
        PassContractError: Naming the pass, what it lacks, and the passes before it.
    """
    known = set(facts) | {"plan"}
    ran = list(history)
    for p in passes:
        if p.before_weights and "weights_quantized" in known:
            raise PassContractError(
                f"pass {p.name!r} must run before weight quantization "
                f"(passes before it: {', '.join(ran) or 'none'})"
            )
        missing = [r for r in p.requires if r not in known]
        if missing:
            before = ", ".join(ran) or "none"
            raise PassContractError(
                f"pass {p.name!r} requires {missing}, which no earlier pass ensured "
                f"(passes run so far: {before})"
            )
        known.update(p.ensures)
        ran.append(p.name)


class Pipeline:
    """An ordered list of passes, run unit by unit through the block-wise runner."""

    def __init__(self, passes: Sequence[Pass]) -> None:
        self.passes = list(passes)

    @property
    def needs_calibration(self) -> bool:
        return any(p.needs_calibration for p in self.passes)

    def run(self, state: QuantState, ctx: PassContext) -> QuantState:
        """Run every pass over ``state.model`` (in memory, on ``ctx.device``)."""
        from ptq.calibration.runner import run_passes
        from ptq.models.weight_source import InMemorySource

        run_passes(InMemorySource(state.model, ctx.device), state, self.passes, ctx)
        return state

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(map(repr, self.passes))}])"
