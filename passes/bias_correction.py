"""Bias correction and statistics tuning of quantized layers.

Quantizing a layer shifts the mean of its output: for input ``x`` drawn from the
calibration data, ``E[y_fp - y_q] = E[x W^T + b - Q_layer(x)]`` is in general non-zero
(weight rounding and activation quantization are biased on real data). Adding that
expectation, estimated per output channel over the calibration data,

    b <- b + mean_x (x W_fp^T + b - Q_layer(x))

removes the shift (a bias is created where the layer had none): Nagel et al.,
"Data-Free Quantization", 2019 (empirical bias correction). With ``gain=True`` each
channel's output is first rescaled by the least-squares gain
``g = cov(y_fp, y_q) / var(y_q)`` (see :mod:`ptq.passes.output_stats`), folded into the
weight's per-channel scales; this is the norm re-estimation step of Hubara et al.
("Accurate Post Training Quantization With Small Calibration Sets", ICML 2021: bias and
batch-norm tuning), fitted for least output MSE. The inputs ``x`` are the quantized
model's own (on each unit of the block-wise runner: the calibration stream through the
already quantized and corrected earlier blocks); the FP reference ``y_fp`` is the layer
with its FP weight on those same inputs. Linear layers (and transformers ``Conv1D``) and
convolutions are corrected.

Like :class:`~ptq.passes.lorc.LoRCPass`, :class:`BiasCorrectionPass` wraps the weight
pass so it can keep the FP weights that pass discards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from ptq.formats import dequantize
from ptq.formats.scales import encode_scale
from ptq.frontend.qconv import QuantConv2d
from ptq.frontend.quantizable import is_hf_conv1d
from ptq.passes.output_stats import ChannelMoments
from ptq.pipeline import Pass, PassContext, QuantState
from ptq.qlinear import QuantLinear

QuantLayer = QuantLinear | QuantConv2d
GAIN_SCALE_FORMATS = ("fp32", "fp16", "bf16")


def fp_weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Copies of an FP layer's weight (in the orientation its quantized twin uses) and bias.

    Raises:
        ValueError: ``module`` is already quantized or is not a Linear/conv layer.
    """
    if isinstance(module, QuantLinear | QuantConv2d):
        raise ValueError("snapshot the FP weights before the weight pass quantizes them")
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor) or not (
        isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d) or is_hf_conv1d(module)
    ):
        raise ValueError(f"{type(module).__name__} is not a Linear or convolution layer")
    w = weight.detach().float().clone()
    b = bias.detach().float().clone() if isinstance(bias, torch.Tensor) else None
    return (w.t().contiguous() if is_hf_conv1d(module) else w), b


def fp_output(
    module: QuantLayer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The layer's output on ``x`` with its FP ``weight``/``bias`` (no quantization)."""
    if isinstance(module, QuantLinear):
        return nn.functional.linear(x.float(), weight, bias)
    params = {"weight": weight.to(module.conv.weight.dtype)}
    if module.conv.bias is not None or bias is not None:
        params["bias"] = bias if bias is not None else torch.zeros(weight.shape[0])
    out: torch.Tensor = functional_call(module.conv, params, (x,), strict=False)
    return out.float()


def output_moments(
    model: nn.Module,
    fp: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    forwards: Sequence[Callable[[], Any]],
) -> dict[str, ChannelMoments]:
    """Per-channel moments of each named quantized layer's output against its FP twin,
    over the calibration ``forwards`` (a unit's, :meth:`ptq.calibration.units.Unit.forwards`)."""
    moments: dict[str, ChannelMoments] = {}
    handles = []
    for name, (w, b) in fp.items():
        module = model.get_submodule(name)
        if not isinstance(module, QuantLinear | QuantConv2d):
            raise ValueError(f"{name} is not quantized; run the weight pass first")
        channel_dim = -1 if isinstance(module, QuantLinear) else 1
        moments[name] = ChannelMoments(int(w.shape[0]))

        def hook(
            m: nn.Module,
            args: tuple[Any, ...],
            y: torch.Tensor,
            name: str = name,
            w: torch.Tensor = w,
            b: torch.Tensor | None = b,
            channel_dim: int = channel_dim,
        ) -> None:
            y_fp = fp_output(m, args[0].detach(), w, b)  # type: ignore[arg-type]
            moments[name].add(y_fp, y.detach().float(), channel_dim)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for forward in forwards:
                forward()
    finally:
        for h in handles:
            h.remove()
    return moments


def gain_blocker(module: QuantLayer) -> str | None:
    """Why a per-output-channel gain cannot be folded into ``module``'s scales, or None."""
    q = module.qweight
    if q.global_scale is not None or q.channel_scale is not None:
        return "two-level scales"
    if q.fmt.scale_format not in GAIN_SCALE_FORMATS:
        return f"{q.fmt.scale_format} scales"
    if q.scale.shape[0] != q.shape[0]:
        return "scale blocks span several output channels"
    if isinstance(module, QuantLinear) and module.lorc_u is not None:
        return "low-rank compensation factors"
    return None


def apply_gain(module: QuantLayer, gain: torch.Tensor) -> None:
    """``W <- diag(g) W`` by rescaling each output channel's scales (re-encoded).

    Raises:
        ValueError: :func:`gain_blocker` names a reason the gain cannot be folded.
    """
    if (reason := gain_blocker(module)) is not None:
        raise ValueError(f"cannot fold a per-channel gain into this layer: {reason}")
    q = module.qweight
    fmt = q.fmt.scale_format
    scaled = q.scale.abs() * gain.to(q.scale.dtype).reshape(-1, 1)
    new_q = replace(q, scale=q.scale.sign() * encode_scale(scaled, fmt))
    module.qweight = new_q
    w = dequantize(new_q)
    if isinstance(module, QuantLinear):
        module.weight = nn.Parameter(w.to(module.weight.dtype), requires_grad=False)
    else:
        conv = module.conv
        w4 = w.reshape(module.weight_shape).to(conv.weight.dtype)
        conv.weight = nn.Parameter(w4, requires_grad=False)


def add_bias(module: QuantLayer, delta: torch.Tensor) -> None:
    """``b <- b + delta``, creating a zero bias first if the layer has none."""
    owner: nn.Module = module if isinstance(module, QuantLinear) else module.conv
    bias = owner.bias
    if not isinstance(bias, torch.Tensor):
        bias = nn.Parameter(torch.zeros(delta.shape[0]), requires_grad=False)
        owner.bias = bias
    with torch.no_grad():
        bias.add_(delta.to(bias.dtype))


@dataclass(frozen=True, kw_only=True)
class BiasCorrectionConfig:
    """Args:
    activation_quantized_only: Correct only layers with activation quantization.
    gain: Also fit each output channel's least-squares gain (norm re-estimation),
        where it folds into the scales (fp32/fp16/bf16 per-row scales, no LoRC).
    gain_bounds: Clamp of the gain (guards near-dead channels).
    """

    activation_quantized_only: bool = True
    gain: bool = False
    gain_bounds: tuple[float, float] = (0.5, 2.0)

    def __post_init__(self) -> None:
        lo, hi = self.gain_bounds
        if not 0.0 < lo <= 1.0 <= hi:
            raise ValueError(f"gain_bounds need 0 < lo <= 1 <= hi, got {self.gain_bounds}")


class BiasCorrectionPass(Pass):
    """Run ``inner`` (the weight pass, then e.g. static activation calibration), then fit
    each layer's output gain (optional) and add ``E[y_fp - y_q]`` to its bias.
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

    def inner_passes(self) -> list[Pass]:
        return list(self.inner)

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        unit = state.unit
        assert unit is not None
        cfg = self.config
        names = [
            n
            for n in unit.layers
            if state.plan.layers[n].activation is not None or not cfg.activation_quantized_only
        ]
        fp = {n: fp_weight_and_bias(state.model.get_submodule(n)) for n in names}
        for p in self.inner:
            p.run_unit(state, ctx)
        if not names:
            return
        if ctx.calibration is None:
            raise ValueError("bias_correction needs calibration tokens (ctx.calibration is None)")
        records: dict[str, dict[str, Any]] = {n: {} for n in names}
        if cfg.gain:
            for n, mom in output_moments(state.model, fp, unit.forwards()).items():
                module = state.model.get_submodule(n)
                assert isinstance(module, QuantLinear | QuantConv2d)
                if (reason := gain_blocker(module)) is not None:
                    records[n]["gain_skipped"] = reason
                    continue
                gain = mom.gain(*cfg.gain_bounds)
                apply_gain(module, gain)
                records[n]["gain_mean"] = float(gain.mean())
                records[n]["gain_min"] = float(gain.min())
                records[n]["gain_max"] = float(gain.max())
        for n, mom in output_moments(state.model, fp, unit.forwards()).items():
            delta = mom.shift()
            module = state.model.get_submodule(n)
            assert isinstance(module, QuantLinear | QuantConv2d)
            add_bias(module, delta)
            records[n]["shift_abs_mean"] = float(delta.abs().mean())
            records[n]["mse_reduction"] = float(mom.mse_reduction().mean())
        ctx.records.setdefault("bias_correction", {}).update(records)
