"""Shared driver for per-layer rounding optimisers (GPTQ, AdaRound, AdaQuant).

A :class:`LayerwisePass` declares the statistics it needs (:class:`StatsRequest`) and
implements :meth:`quantize_layer`; on each unit of the block-wise runner it quantizes
the unit's layers stage by stage (:func:`ptq.calibration.stages.run_stages`) from the
calibration stream, and the runner propagates the quantized outputs. Every layer is seen as ``Y = X W^T``
over input rows (:mod:`ptq.calibration.layer_inputs`): Linear, GPT-2 ``Conv1D`` (weight
transposed) and ``nn.Conv1d/2d`` (weight ``[O, I/g * kh * kw]``, im2col rows). Quantized
layers become :class:`~ptq.qlinear.QuantLinear` or
:class:`~ptq.frontend.qconv.QuantConv2d`. Every layer's reconstruction error is recorded
in ``ctx.records["layers"]`` (written to the output as JSON). Under ``torchrun``
(``ctx.distributed``) the runner shards the batches and each layer is quantized by one
rank and installed on the others (:mod:`ptq.calibration.layer_parallel`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from ptq.calibration.layer_inputs import geometry, rows_forward
from ptq.calibration.stages import LayerStats, StageParallel, StatsRequest, run_stages
from ptq.formats import QTensor
from ptq.frontend.qconv import QuantConv2d
from ptq.modules import replace_module
from ptq.pipeline import Pass, PassContext, QuantState
from ptq.plan import LayerPlan
from ptq.qlinear import QuantLinear
from ptq.scheme import ActivationScheme
from ptq.steps import record_step

QUANTIZED_TYPES: tuple[type[nn.Module], ...] = (QuantLinear, QuantConv2d)


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor, groups: int = 1) -> float:
    """Relative output error ``||X (W - Q)^T||^2 / ||X W^T||^2`` on cached rows ``x``.

    ``groups > 1`` multiplies block-diagonally (grouped convs; see ``rows_forward``).
    """
    if x.numel() == 0:
        return math.nan
    ref = rows_forward(w, None, x, groups)
    diff = rows_forward(w - q, None, x, groups)
    return float(diff.pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))


def layer_bias(layer: nn.Module) -> torch.Tensor | None:
    """The layer's bias as an fp32 tensor, or None."""
    b = getattr(layer, "bias", None)
    return b.detach().float() if isinstance(b, torch.Tensor) else None


def quantized_module(
    layer: nn.Module,
    qweight: QTensor,
    bias: torch.Tensor | None,
    activation: ActivationScheme | None,
) -> nn.Module:
    """The emulated quantized replacement of ``layer`` with weight ``qweight`` [O, K].

    Raises:
        ValueError: ``layer`` is not a Linear, HF ``Conv1D`` or ``nn.Conv1d/2d``.
    """
    geo = geometry(layer)
    if geo.kind != "conv":
        return QuantLinear(qweight, bias, activation)
    assert isinstance(layer, nn.Conv1d | nn.Conv2d)
    new = QuantConv2d(layer, qweight, activation)
    if bias is not None:
        new.conv.bias = nn.Parameter(
            bias.detach().to(new.conv.weight.dtype).clone(), requires_grad=False
        )
    return new


class LayerwisePass(Pass):
    """Base of per-layer weight optimisers run by the block-wise runner."""

    needs_calibration: ClassVar[bool] = True
    ensures: ClassVar[tuple[str, ...]] = ("weights_quantized",)

    def stats_request(self) -> StatsRequest:
        raise NotImplementedError

    def quantize_layer(
        self, name: str, layer: nn.Module, plan: LayerPlan, stats: LayerStats, ctx: PassContext
    ) -> tuple[QTensor, torch.Tensor | None, dict[str, Any]]:
        """Return the quantized ``[O, K]`` weight, an optional new bias and a record."""
        raise NotImplementedError

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        unit = state.unit
        assert unit is not None
        if not unit.layers:
            return
        if ctx.calibration is None:
            raise ValueError(f"pass {self.name!r} needs calibration data (none was loaded)")
        model, plan = state.model, state.plan
        records: dict[str, Any] = ctx.records.setdefault("layers", {})
        results: dict[str, tuple[QTensor, torch.Tensor | None, dict[str, Any]]] = {}

        def install(name: str, qt: QTensor, bias: torch.Tensor | None, rec: dict[str, Any]) -> None:
            records[name] = rec
            record_step(ctx.records, name, str(rec.get("fallback", rec["method"])))
            short = ".".join(name.rsplit(".", 2)[-2:])
            ctx.status = f"{short} err={rec.get('rel_output_error', math.nan):.2e}"
            layer = model.get_submodule(name)
            activation = plan.layers[name].activation
            if activation is not None and not activation.dynamic:
                # no scale yet: the layer reads FP activations in the later stages'
                # forwards; the act_calibration pass sets its scale and its scheme
                activation = None
            replace_module(model, name, quantized_module(layer, qt, bias, activation))

        def quantize(name: str, stats: LayerStats) -> None:
            layer = model.get_submodule(name)
            if isinstance(layer, QUANTIZED_TYPES):
                return
            with torch.enable_grad():  # the runner holds no_grad; optimisers need autograd
                qt, bias, record = self.quantize_layer(name, layer, plan.layers[name], stats, ctx)
            record["method"] = self.name
            new_bias = bias if bias is not None else getattr(layer, "bias", None)
            if parallel is not None:
                results[name] = (qt, new_bias, record)
            install(name, qt, new_bias, record)

        parallel: StageParallel | None = None
        dist = ctx.distributed
        if dist is not None and dist.world > 1:
            from ptq.calibration.layer_parallel import LayerParallel

            parallel = LayerParallel(dist, results, install)
        run_stages(unit, self.stats_request(), quantize, parallel)
