"""GPTQ as a pass: Hessians from the block-wise runner, maths in :mod:`gptq_math`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ptq.calibration.runner import LayerStats, StatsRequest
from ptq.formats import QTensor
from ptq.passes.gptq_math import GPTQConfig, gptq_quantize
from ptq.passes.layerwise import LayerwisePass, output_error
from ptq.pipeline import PassContext
from ptq.plan import LayerPlan


@dataclass(frozen=True, kw_only=True)
class GPTQPassConfig:
    """GPTQ knobs (Frantar et al., 2022).

    Args:
        block_size: Columns per lazy batch update.
        percdamp: Hessian damping as a fraction of its mean diagonal.
        act_order: Quantize columns by decreasing Hessian diagonal (uses static groups).
        scale_mode: ``dynamic`` (scales from the error-updated weights) or ``static``.
    """

    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    scale_mode: Literal["static", "dynamic"] = "dynamic"

    def __post_init__(self) -> None:
        self.math_config()  # validates

    def math_config(self) -> GPTQConfig:
        mode = "static" if self.act_order else self.scale_mode
        return GPTQConfig(
            block_size=self.block_size,
            percdamp=self.percdamp,
            act_order=self.act_order,
            scale_mode=mode,
        )


class GPTQPass(LayerwisePass):
    """Quantize each planned Linear with GPTQ, true-sequentially inside each block."""

    name: ClassVar[str] = "gptq"

    def __init__(self, config: GPTQPassConfig | None = None) -> None:
        self.config = config or GPTQPassConfig()

    def stats_request(self) -> StatsRequest:
        return StatsRequest(hessian=True, input_rows=512)

    def quantize_layer(
        self, name: str, layer: nn.Linear, plan: LayerPlan, stats: LayerStats, ctx: PassContext
    ) -> tuple[QTensor, torch.Tensor | None, dict[str, Any]]:
        assert stats.hessian is not None
        res = gptq_quantize(
            layer.weight.detach(),
            stats.hessian.hessian(),
            plan.weight,
            layer_name=name,
            config=self.config.math_config(),
        )
        record = {
            "hessian_error": res.stats.error,
            "rel_output_error": output_error(
                layer.weight.detach().float(), res.weight, stats.input_rows()
            ),
            "damp": res.stats.damp,
            "retries": res.stats.retries,
            "dead_columns": res.stats.dead_columns,
            "seconds": res.stats.time_s,
        }
        return res.qtensor, None, record
