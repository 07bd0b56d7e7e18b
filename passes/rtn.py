"""Round-to-nearest weight quantization: the floor every other method must beat.

Each planned layer is replaced by its emulated quantized module whose weight is
``Q(W)`` with scales from the format's rule (amax or MSE clip search) and codes rounded
to nearest-even: a :class:`~ptq.qlinear.QuantLinear` for Linear and GPT-2 ``Conv1D``
(on ``W^T``), a :class:`~ptq.frontend.qconv.QuantConv2d` for ``nn.Conv1d/2d`` (on
``W.reshape(O, -1)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ptq.calibration.layer_inputs import weight_2d
from ptq.formats import quantize
from ptq.modules import replace_module
from ptq.pipeline import Pass, PassContext, QuantState


@dataclass(frozen=True, kw_only=True)
class RTNConfig:
    """Round-to-nearest has no knobs beyond the plan's formats."""


class RTNPass(Pass):
    """Quantize every planned layer with round-to-nearest."""

    name: ClassVar[str] = "rtn"
    ensures: ClassVar[tuple[str, ...]] = ("weights_quantized",)

    def __init__(self, config: RTNConfig | None = None) -> None:
        self.config = config or RTNConfig()

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        from ptq.passes.layerwise import QUANTIZED_TYPES, quantized_module

        assert state.unit is not None
        for name in state.unit.layers:
            module = state.model.get_submodule(name)
            if isinstance(module, QUANTIZED_TYPES):
                continue
            lp = state.plan.layers[name]
            q = quantize(weight_2d(module).float(), lp.weight)
            bias = getattr(module, "bias", None)
            replace_module(state.model, name, quantized_module(module, q, bias, lp.activation))
