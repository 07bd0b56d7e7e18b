"""Round-to-nearest weight quantization: the floor every other method must beat.

Each planned Linear is replaced by a :class:`~ptq.qlinear.QuantLinear` whose weight is
``Q(W)`` with scales from the format's rule (amax or MSE clip search) and codes rounded
to nearest-even.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from tqdm.auto import tqdm

from ptq.formats import quantize
from ptq.pipeline import Pass, PassContext, QuantState
from ptq.qlinear import QuantLinear


@dataclass(frozen=True, kw_only=True)
class RTNConfig:
    """Round-to-nearest has no knobs beyond the plan's formats."""


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class RTNPass(Pass):
    """Quantize every planned Linear with round-to-nearest."""

    name: ClassVar[str] = "rtn"
    ensures: ClassVar[tuple[str, ...]] = ("weights_quantized",)

    def __init__(self, config: RTNConfig | None = None) -> None:
        self.config = config or RTNConfig()

    def run(self, state: QuantState, ctx: PassContext) -> None:
        layers = [
            lp
            for lp in state.plan
            if not isinstance(state.model.get_submodule(lp.name), QuantLinear)
        ]
        for lp in tqdm(layers, desc="rtn", disable=not ctx.progress, unit="layer"):
            module = state.model.get_submodule(lp.name)
            assert isinstance(module, nn.Linear)
            q = quantize(module.weight.detach(), lp.weight)
            replace_module(state.model, lp.name, QuantLinear(q, module.bias, lp.activation))
