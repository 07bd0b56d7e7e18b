"""Shared driver for per-layer rounding optimisers (GPTQ, AdaRound, AdaQuant).

A :class:`LayerwisePass` declares the statistics it needs (:class:`StatsRequest`) and
implements :meth:`quantize_layer`; the block-wise runner feeds it one stage of one block
at a time and propagates the quantized outputs. Every layer's reconstruction error is
recorded in ``ctx.records["layers"]`` (written to the output as JSON).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ptq.calibration.runner import BlockwiseRunner, LayerStats, StatsRequest
from ptq.formats import QTensor
from ptq.pipeline import Pass, PassContext, QuantState
from ptq.plan import LayerPlan
from ptq.qlinear import QuantLinear

CALIBRATION_BATCH = 8


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path ``name`` for ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    """Relative output error ``||X (W - Q)^T||^2 / ||X W^T||^2`` on cached rows ``x``."""
    if x.numel() == 0:
        return math.nan
    ref = x @ w.T
    return float((x @ (w - q).T).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))


class LayerwisePass(Pass):
    """Base of per-layer weight optimisers run by the block-wise runner."""

    needs_calibration: ClassVar[bool] = True
    ensures: ClassVar[tuple[str, ...]] = ("weights_quantized",)

    def stats_request(self) -> StatsRequest:
        raise NotImplementedError

    def quantize_layer(
        self, name: str, layer: nn.Linear, plan: LayerPlan, stats: LayerStats, ctx: PassContext
    ) -> tuple[QTensor, torch.Tensor | None, dict[str, Any]]:
        """Return the quantized weight, an optional new bias and a record for the layer."""
        raise NotImplementedError

    def run(self, state: QuantState, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise ValueError(f"pass {self.name!r} needs calibration data (none was loaded)")
        model, plan = state.model, state.plan
        records: dict[str, Any] = ctx.records.setdefault("layers", {})
        last: list[str] = [""]

        def quantize(name: str, stats: LayerStats) -> None:
            layer = model.get_submodule(name)
            if isinstance(layer, QuantLinear):
                return
            assert isinstance(layer, nn.Linear)
            lp = plan.layers[name]
            with torch.enable_grad():  # the runner holds no_grad; optimisers need autograd
                qt, bias, record = self.quantize_layer(name, layer, lp, stats, ctx)
            record["method"] = self.name
            records[name] = record
            last[0] = (
                f"{name.rsplit('.', 2)[-2]}.{name.rsplit('.', 1)[-1]} err={record.get('rel_output_error', math.nan):.2e}"
            )
            new_bias = bias if bias is not None else layer.bias
            replace_module(model, name, QuantLinear(qt, new_bias, lp.activation))

        runner = BlockwiseRunner(
            request=self.stats_request(),
            quantize=quantize,
            batch_size=CALIBRATION_BATCH,
            progress=ctx.progress,
            describe=lambda: last[0],
        )
        runner.run(model, [lp.name for lp in plan], ctx.calibration)
