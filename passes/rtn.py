"""Round-to-nearest weight quantization: the floor every other method must beat.

Each planned layer is replaced by its emulated quantized module whose weight is
``Q(W)`` with scales from the format's rule (amax, span, full-range, or an MSE clip
search) and codes rounded to nearest-even: a :class:`~ptq.qlinear.QuantLinear` for
Linear and GPT-2 ``Conv1D`` (on ``W^T``), a :class:`~ptq.frontend.qconv.QuantConv2d`
for ``nn.Conv1d/2d`` (on ``W.reshape(O, -1)``).

``rounding="stochastic"`` rounds every code as ``floor(w / s + u)``, ``u ~ U[0, 1)``
(Gupta et al., "Deep Learning with Limited Numerical Precision", 2015), so
``E[Q(w)] = w``: unbiased, but with a larger squared error than nearest rounding. The
noise of each layer comes from a generator seeded with the run's seed and the layer's
name, so a run (resumed or not, on any device) is reproducible bit for bit.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

from ptq.calibration.layer_inputs import weight_2d
from ptq.formats import quantize
from ptq.formats.rounding import RoundingMode
from ptq.modules import replace_module
from ptq.pipeline import Pass, PassContext, QuantState
from ptq.steps import record_rounding, record_step

ROUNDING_MODES: tuple[RoundingMode, ...] = ("nearest", "stochastic")
STOCHASTIC_SALT = 0x57000000


def layer_salt(name: str) -> int:
    """A generator salt of its own for layer ``name`` (stable across runs and processes)."""
    return STOCHASTIC_SALT + zlib.crc32(name.encode("utf-8"))


@dataclass(frozen=True, kw_only=True)
class RTNConfig:
    """Args:
    rounding: ``nearest`` (ties to even) or seeded ``stochastic``.
    """

    rounding: RoundingMode = "nearest"

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(
                f"rounding must be one of {', '.join(ROUNDING_MODES)}, not {self.rounding!r}"
            )


class RTNPass(Pass):
    """Quantize every planned layer with round-to-nearest (or stochastic rounding)."""

    name: ClassVar[str] = "rtn"
    ensures: ClassVar[tuple[str, ...]] = ("weights_quantized",)

    def __init__(self, config: RTNConfig | None = None) -> None:
        self.config = config or RTNConfig()

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        from ptq.passes.layerwise import QUANTIZED_TYPES, quantized_module

        assert state.unit is not None
        mode = self.config.rounding
        for name in state.unit.layers:
            module = state.model.get_submodule(name)
            if isinstance(module, QUANTIZED_TYPES):
                continue
            lp = state.plan.layers[name]
            gen = ctx.generator(layer_salt(name)) if mode == "stochastic" else None
            q = quantize(weight_2d(module).float(), lp.weight, rounding=mode, generator=gen)
            bias = getattr(module, "bias", None)
            replace_module(state.model, name, quantized_module(module, q, bias, lp.activation))
            record_step(ctx.records, name, self.name)
            if mode != "nearest":
                record_rounding(ctx.records, name, mode)
