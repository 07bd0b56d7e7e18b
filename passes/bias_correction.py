"""Empirical bias correction of quantized layers (Nagel et al., "Data-Free Quantization", 2019).

Quantizing a layer shifts the mean of its output: for input ``x`` drawn from the
calibration data, ``E[y_fp - y_q] = E[x W^T + b - Q_layer(x)]`` is in general non-zero
(weight rounding and activation quantization are biased on real data). Adding that
expectation, estimated per output channel over the calibration tokens,

    b <- b + mean_x (x W_fp^T + b - Q_layer(x))

removes the shift (a bias is created where the layer had none). The inputs ``x`` are the
quantized model's own (empirical correction), observed in one forward pass.

Like :class:`~ptq.passes.lorc.LoRCPass`, :class:`BiasCorrectionPass` wraps the weight
pass so it can keep the FP weights that pass discards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ptq.passes._groups import tensor_attr
from ptq.passes.act_calibration import run_calibration
from ptq.passes.lorc import snapshot_weights
from ptq.pipeline import Pass, PassContext, Pipeline, QuantState
from ptq.qlinear import QuantLinear


def output_bias_shift(
    model: nn.Module,
    fp_weights: dict[str, torch.Tensor],
    fp_biases: dict[str, torch.Tensor | None],
    tokens: torch.Tensor,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """``mean_x (x W_fp^T + b_fp - layer(x))`` [out] for each named QuantLinear."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, w in fp_weights.items():
        module = model.get_submodule(name)
        if not isinstance(module, QuantLinear):
            raise ValueError(f"{name} is not a QuantLinear; run the weight pass first")

        def hook(
            _m: nn.Module,
            args: tuple[Any, ...],
            y: torch.Tensor,
            name: str = name,
            w: torch.Tensor = w,
        ) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            y_fp = nn.functional.linear(x, w, fp_biases.get(name))
            d = (y_fp - y.detach().reshape(-1, y.shape[-1]).float()).double().sum(dim=0)
            sums[name] = sums[name] + d if name in sums else d
            counts[name] = counts.get(name, 0) + x.shape[0]

        handles.append(module.register_forward_hook(hook))
    try:
        run_calibration(model, tokens, batch_size)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}


def add_bias(module: QuantLinear, delta: torch.Tensor) -> None:
    """``b <- b + delta``, creating a zero bias first if the layer has none."""
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(module.out_features), requires_grad=False)
    with torch.no_grad():
        module.bias.add_(delta.to(module.bias.dtype))


@dataclass(frozen=True, kw_only=True)
class BiasCorrectionConfig:
    """Args:
    activation_quantized_only: Correct only layers with activation quantization.
    batch_size: Calibration sequences per forward.
    """

    activation_quantized_only: bool = True
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


class BiasCorrectionPass(Pass):
    """Run ``inner`` (the weight pass, then e.g. static activation calibration), then add
    ``E[y_fp - y_q]`` to each layer's bias.
    """

    name: ClassVar[str] = "bias_correction"
    needs_calibration: ClassVar[bool] = True

    def __init__(
        self, inner: Pass | Sequence[Pass], config: BiasCorrectionConfig | None = None
    ) -> None:
        self.inner = [inner] if isinstance(inner, Pass) else list(inner)
        if not self.inner:
            raise ValueError("bias_correction needs at least one inner (weight) pass")
        self.config = config or BiasCorrectionConfig()
        self.requires = self.inner[0].requires  # type: ignore[misc]
        ensures = [e for p in self.inner for e in p.ensures]
        self.ensures = (*ensures, "bias_corrected")  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"bias_correction({self.config!r}, inner={self.inner!r})"

    def run(self, state: QuantState, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise ValueError("bias_correction needs calibration tokens (ctx.calibration is None)")
        names = [
            lp.name
            for lp in state.plan
            if lp.activation is not None or not self.config.activation_quantized_only
        ]
        fp_w = snapshot_weights(state.model, names)
        fp_b: dict[str, torch.Tensor | None] = {}
        for n in names:
            m = state.model.get_submodule(n)
            has_bias = getattr(m, "bias", None) is not None
            fp_b[n] = tensor_attr(m, "bias").detach().float().clone() if has_bias else None
        Pipeline(self.inner).run(state, ctx)
        shift = output_bias_shift(state.model, fp_w, fp_b, ctx.calibration, self.config.batch_size)
        for n, delta in shift.items():
            module = state.model.get_submodule(n)
            assert isinstance(module, QuantLinear)
            add_bias(module, delta)
        ctx.records["bias_correction"] = {n: float(d.abs().mean()) for n, d in shift.items()}
