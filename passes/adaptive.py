"""AdaRound and AdaQuant as passes over the block-wise runner.

Each layer is optimised on its cached calibration input rows (the outputs of the already
quantized earlier layers, so errors do not accumulate unseen) against the FP layer's
outputs on the same rows. Convolutions are optimised as matmuls over im2col rows with
the weight ``[O, I/g kh kw]`` (block-diagonal over groups); GPT-2 ``Conv1D`` on its
transposed weight. Maths: :mod:`adaround_math` (Nagel et al., 2020) and
:mod:`adaquant_math` (Hubara et al., 2021).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ptq.calibration.layer_inputs import geometry, rows_forward, weight_2d
from ptq.calibration.stages import LayerStats, StatsRequest
from ptq.formats import QTensor
from ptq.passes.adaquant_math import AdaQuantConfig, adaquant_layer
from ptq.passes.adaround_math import AdaRoundConfig, adaround_reconstruct
from ptq.passes.layerwise import LayerwisePass, layer_bias, output_error
from ptq.pipeline import PassContext
from ptq.plan import LayerPlan


@dataclass(frozen=True, kw_only=True)
class AdaRoundPassConfig(AdaRoundConfig):
    """AdaRound options plus how many calibration rows (tokens/patches) to cache per layer."""

    input_rows: int = 2048


@dataclass(frozen=True, kw_only=True)
class AdaQuantPassConfig(AdaQuantConfig):
    """AdaQuant options plus how many calibration rows (tokens/patches) to cache per layer."""

    input_rows: int = 2048


def _base(cfg: Any, base: type) -> Any:
    return base(**{f.name: getattr(cfg, f.name) for f in fields(base)})


def _rows(stats: LayerStats, name: str) -> torch.Tensor:
    x = stats.input_rows()
    if x.numel() == 0:
        raise ValueError(f"layer {name!r} saw no calibration inputs (is it on the forward path?)")
    return x.float()


class _RowReconstructionPass(LayerwisePass):
    """Shared plumbing: cache ``config.input_rows`` calibration rows per layer."""

    config: AdaRoundPassConfig | AdaQuantPassConfig

    def stats_request(self) -> StatsRequest:
        return StatsRequest(input_rows=self.config.input_rows)

    @staticmethod
    def layer_problem(
        name: str, layer: nn.Module, stats: LayerStats
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(x, w, groups)``: cached input rows, the 2-D weight and its conv groups."""
        return _rows(stats, name), weight_2d(layer), geometry(layer).groups


class AdaRoundPass(_RowReconstructionPass):
    """Learned up/down rounding per layer (rectified sigmoid, annealed regulariser)."""

    name: ClassVar[str] = "adaround"

    def __init__(self, config: AdaRoundPassConfig | None = None) -> None:
        self.config = config or AdaRoundPassConfig()

    def quantize_layer(
        self, name: str, layer: nn.Module, plan: LayerPlan, stats: LayerStats, ctx: PassContext
    ) -> tuple[QTensor, torch.Tensor | None, dict[str, Any]]:
        x, w, groups = self.layer_problem(name, layer, stats)
        b = layer_bias(layer)
        with torch.no_grad():
            y = rows_forward(w, b, x, groups)

        def forward(ws: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
            return rows_forward(ws["weight"], b, xb, groups)

        res = adaround_reconstruct(
            {"weight": w},
            {"weight": plan.weight},
            forward,
            x,
            y,
            _base(self.config, AdaRoundConfig),
        )["weight"]
        record = {
            "rel_output_error": output_error(w, res.weight, x, groups),
            "loss_start": res.loss_start,
            "loss_end": res.loss_end,
            "non_binary_fraction": res.non_binary_fraction(),
        }
        return res.qtensor, None, record


class AdaQuantPass(_RowReconstructionPass):
    """Per-layer optimisation of weights, scales and bias for output MSE."""

    name: ClassVar[str] = "adaquant"

    def __init__(self, config: AdaQuantPassConfig | None = None) -> None:
        self.config = config or AdaQuantPassConfig()

    def quantize_layer(
        self, name: str, layer: nn.Module, plan: LayerPlan, stats: LayerStats, ctx: PassContext
    ) -> tuple[QTensor, torch.Tensor | None, dict[str, Any]]:
        x, w, groups = self.layer_problem(name, layer, stats)

        def forward(wq: torch.Tensor, bq: torch.Tensor | None, xb: torch.Tensor) -> torch.Tensor:
            return rows_forward(wq, bq, xb, groups)

        res = adaquant_layer(
            w,
            x,
            plan.weight,
            bias=layer_bias(layer),
            forward=forward,
            config=_base(self.config, AdaQuantConfig),
        )
        record = {
            "rel_output_error": output_error(w, res.weight, x, groups),
            "loss_start": res.loss_start,
            "loss_end": res.loss_end,
            "kept_start": res.kept_start,
        }
        return res.qtensor, res.bias, record
