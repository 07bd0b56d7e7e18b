"""A unit of the block-wise runner: what a pass sees at each step.

The runner walks a model as ``block 0, ..., block N-1, outer``: every decoder (or
encoder) block in turn, then the *outer* part (final norm, LM head, anything outside
the blocks); a model without repeated blocks (a CNN) is a single ``model`` unit. A
:class:`Unit` names the step, the module whose planned layers are being decided, and
how to run it on the calibration data:

* a block runs on the calibration stream (the quantized model's activations entering
  it, :mod:`ptq.calibration.streams`), and on the floating-point stream for passes
  that observe the FP model (SmoothQuant);
* the outer unit runs the whole model's forward with every block *replayed* (returning
  the stored output of the last block instead of computing), so the head sees the
  quantized model's final hidden states without any block being loaded;
* a ``model`` unit runs the whole model on each calibration batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ptq.calibration.blocks import BlockInput, block_output, forward_batch
from ptq.calibration.streams import Stream

UnitKind = Literal["block", "outer", "model"]


class ReplayBlock(nn.Module):
    """Stands in for a block: returns a stored hidden state whatever it is given."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.hidden = hidden
        self.as_tuple = as_tuple

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        return (self.hidden,) if self.as_tuple else self.hidden


def replayed_forward(
    model: nn.Module, blocks: nn.ModuleList, hidden: torch.Tensor, batch: Any, as_tuple: bool
) -> Any:
    """``forward_batch(model, batch)`` with every block replaced by a replay of ``hidden``."""
    saved = list(blocks)
    stand_in = ReplayBlock(hidden, as_tuple)
    for i in range(len(blocks)):
        blocks[i] = stand_in
    try:
        return forward_batch(model, batch)
    finally:
        for i, m in enumerate(saved):
            blocks[i] = m


def block_forward(block: nn.Module, stream: Stream, i: int) -> Any:
    """Block ``block`` on batch ``i`` of ``stream``."""
    x = stream.input(i)
    return block(x.hidden, *x.args, **x.kwargs)


@dataclass
class Unit:
    """One step of the runner.

    Attributes:
        kind: ``block``, ``outer`` or ``model`` (see the module docstring).
        index: Block index (the number of blocks for ``outer``, 0 for ``model``).
        prefix: Name prefix of the unit's layers inside the model (``model.layers.3.``;
            empty for ``outer``/``model``, whose root is the model).
        module: The block (``outer``/``model``: the model).
        model: The whole module tree (other blocks' weights may be on ``meta``).
        layers: Full names of the planned layers inside this unit, in plan order.
        calibration: ``block``: the calibration stream entering it.
        batches: Raw calibration batches (``outer``/``model`` forwards use them).
        final: ``outer``: the calibration stream leaving the last block.
        fp: ``block``: the floating-point stream entering it (None unless a pass
            observes the FP model).
        blocks: ``outer``: the blocks' ``ModuleList`` (replayed during forwards).
        as_tuple: Whether blocks return tuples (replays answer in kind).
    """

    kind: UnitKind
    index: int
    prefix: str
    module: nn.Module
    model: nn.Module
    layers: list[str]
    calibration: Stream | None = None
    batches: list[Any] = field(default_factory=list)
    final: Stream | None = None
    fp: Stream | None = None
    blocks: nn.ModuleList | None = None
    as_tuple: bool = False
    fp_staged: bool = False

    def forwards(self) -> list[Callable[[], Any]]:
        """One callable per calibration batch running this unit on it."""
        if self.kind == "block":
            if self.calibration is None:
                raise ValueError(
                    "no calibration stream: a pass that runs the calibration data must set "
                    "needs_calibration, and the context must hold calibration data"
                )
            return [
                functools.partial(block_forward, self.module, self.calibration, i)
                for i in range(len(self.calibration))
            ]
        if self.kind == "outer":
            if self.final is None or self.blocks is None:
                raise ValueError("no calibration stream reached the outer unit")
            return [
                functools.partial(
                    replayed_forward,
                    self.model,
                    self.blocks,
                    self.final.hidden(i),
                    b,
                    self.as_tuple,
                )
                for i, b in enumerate(self.batches)
            ]
        return [functools.partial(forward_batch, self.model, b) for b in self.batches]

    def sample(self) -> BlockInput:
        """The first calibration batch's block input (stage discovery)."""
        assert self.calibration is not None
        return self.calibration.input(0)

    @torch.no_grad()
    def run_fp(self) -> None:
        """Run the block on every batch of the FP stream (hooks see its layers' inputs).

        The first call's outputs become the next block's FP stream: the FP model's
        activations as they were when the first pass observing them ran. They are staged
        in the stream (:meth:`Stream.stage`: spilled with it, not held in memory) until
        the runner commits them after the block.
        """
        if self.kind != "block" or self.fp is None:
            raise ValueError(
                "this pass observes the floating-point model's activations block by block; "
                f"it cannot run on a {self.kind!r} unit"
            )
        for i in range(len(self.fp)):
            out = block_output(block_forward(self.module, self.fp, i))
            if not self.fp_staged:
                self.fp.stage(i, out)
        self.fp_staged = True
