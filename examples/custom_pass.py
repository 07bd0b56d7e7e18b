"""A custom pass in a programmatic pipeline.

``WeightClipPass`` clips every planned layer's weights to ``k`` standard deviations
before GPTQ quantizes them (a simple outlier-suppression idea), then the usual export
runs. Like every pass it sees the model through the block-wise runner: ``run`` is
called once per block with ``state.plan`` holding that block's layers (the other blocks
are not loaded), so the records accumulate. Usage::

    python examples/custom_pass.py [MODEL] [OUT]     # MODEL defaults to the embedded SmolLM2
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from ptq.api import CalibrationConfig, quantize
from ptq.passes.gptq import GPTQPass, GPTQPassConfig
from ptq.pipeline import Pass, PassContext, QuantState


@dataclass(frozen=True, kw_only=True)
class WeightClipConfig:
    """Clip weights to ``k`` standard deviations of their row."""

    k: float = 6.0

    def __post_init__(self) -> None:
        if self.k <= 0:
            raise ValueError(f"k must be positive, got {self.k}")


class WeightClipPass(Pass):
    """Clip each planned Linear's weight rows to ``mean ± k·std`` (before quantization)."""

    name: ClassVar[str] = "weight_clip"
    ensures: ClassVar[tuple[str, ...]] = ("weights_clipped",)

    def __init__(self, config: WeightClipConfig | None = None) -> None:
        self.config = config or WeightClipConfig()

    @torch.no_grad()
    def run(self, state: QuantState, ctx: PassContext) -> None:
        clipped = 0
        for lp in state.plan:
            w = state.model.get_submodule(lp.name).weight
            mean, std = w.mean(dim=1, keepdim=True), w.std(dim=1, keepdim=True)
            lo, hi = mean - self.config.k * std, mean + self.config.k * std
            clipped += int(((w < lo) | (w > hi)).sum())
            w.copy_(torch.maximum(torch.minimum(w, hi), lo))
        record = ctx.records.setdefault("weight_clip", {"clipped_values": 0})
        record["clipped_values"] += clipped


def main(model: str = "default", out: str = "out/custom-pass") -> None:
    result = quantize(
        model,
        "w4a16",
        output=out,
        overwrite=True,
        pipeline=[
            WeightClipPass(WeightClipConfig(k=5.0)),
            GPTQPass(GPTQPassConfig(act_order=True)),
        ],
        calibration=CalibrationConfig(samples=16, seqlen=128),
    )
    print(
        f"clipped {result.records['weight_clip']['clipped_values']} weights; wrote {result.output}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
