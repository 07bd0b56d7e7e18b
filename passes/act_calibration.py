"""Static activation calibration: per-layer input scales from calibration data.

For a layer whose plan holds a static (``dynamic=False``) per-tensor activation scheme
the runtime quantizes its input with one fixed scale ``s = c / q_max``, where ``c`` is
the clipping threshold an observer (:mod:`ptq.calibration.observers`) chose from the
layer's inputs over every calibration batch:

* ``minmax``: ``c = max |x|`` (nothing clips);
* ``percentile``: the ``p``-th percentile of ``|x|`` (a few outliers clip, the grid is finer);
* ``mse``: the ``c`` minimising the histogram-weighted squared quantization error
  (Banner et al., 2019);
* ``kl``: TensorRT's entropy calibration, the ``c`` minimising ``KL(P || Q)`` between
  the clipped histogram and its quantized version (Migacz, 2017).

On each unit of the block-wise runner the pass observes the inputs of the unit's
already weight-quantized layers (activation quantization of this unit switched off;
earlier blocks are fully quantized, scales included, as the runtime will run them),
then writes ``QuantLinear.input_scale``. Every process of a ``torchrun`` job observes
every batch, so the scales are the same on all ranks.

Also home of :func:`observe_inputs`, which other passes use to record per-layer input
statistics over a unit's forwards with forward pre-hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ptq.calibration.observers import (
    KLObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
)
from ptq.formats import ElementFormat
from ptq.frontend.qconv import QuantConv2d
from ptq.pipeline import Pass, PassContext, QuantState
from ptq.qlinear import QuantLinear

QUANTIZED = (QuantLinear, QuantConv2d)


def observe_inputs(
    model: nn.Module,
    names: list[str],
    forwards: Sequence[Callable[[], Any]],
    observe: Callable[[str, torch.Tensor], None],
) -> None:
    """Call ``observe(name, x2d)`` with every input ``x`` of each named module while
    ``forwards`` run (a unit's calibration forwards)."""
    handles = []
    for name in names:

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0]
            observe(name, x.detach().reshape(-1, x.shape[-1]).float())

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for forward in forwards:
                forward()
    finally:
        for h in handles:
            h.remove()


ObserverName = Literal["minmax", "percentile", "mse", "kl"]
OBSERVERS: tuple[ObserverName, ...] = ("minmax", "percentile", "mse", "kl")


@dataclass(frozen=True, kw_only=True)
class ActCalibrationConfig:
    """Args:
    observer: ``minmax``, ``percentile``, ``mse`` or ``kl`` (module docstring). Default
        ``mse``, the best measured: SmolLM2-135M W8A8 with INT8 per-tensor static
        activations, perplexity minmax 68.64, percentile 300.5, mse 46.33, kl 107.2
        (FP 28.52; benchmarks/results/observers_smollm2.md).
    percentile: The percentile of ``|x|`` the ``percentile`` observer clips at.
    """

    observer: ObserverName = "mse"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(
                f"observer must be one of {', '.join(OBSERVERS)}, not {self.observer!r}"
            )
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")

    def make(self) -> Observer:
        """A fresh per-tensor observer of this kind."""
        if self.observer == "minmax":
            return MinMaxObserver()
        if self.observer == "percentile":
            return PercentileObserver(self.percentile)
        return MSEObserver() if self.observer == "mse" else KLObserver()


def static_scales(
    model: nn.Module,
    names: dict[str, ElementFormat],
    forwards: Sequence[Callable[[], Any]],
    config: ActCalibrationConfig,
) -> dict[str, torch.Tensor]:
    """Per named module, the scale ``c / q_max`` its observer chose for its element format
    from the inputs seen while ``forwards`` run."""
    observers = {n: config.make() for n in names}
    observe_inputs(model, list(names), forwards, lambda n, x: observers[n].update(x))
    return {n: obs.scale(names[n]) for n, obs in observers.items()}


class ActCalibrationPass(Pass):
    """Set ``input_scale = r / q_max`` on every quantized Linear or convolution with a static
    activation scheme (a convolution's observer sees its whole input feature map).

    Runs after the weight pass; the unit's activation quantization is switched off while
    observing so the missing scales do not matter, and restored afterwards. A layer-wise
    weight pass (GPTQ, AdaRound, AdaQuant) installs static-activation layers without their
    activation scheme (they have no scale during its stages); it is set here with the scale.
    """

    name: ClassVar[str] = "act_calibration"
    requires: ClassVar[tuple[str, ...]] = ("weights_quantized",)
    ensures: ClassVar[tuple[str, ...]] = ("activations_calibrated",)
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: ActCalibrationConfig | None = None) -> None:
        self.config = config or ActCalibrationConfig()

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        unit = state.unit
        assert unit is not None
        modules: dict[str, QuantLinear | QuantConv2d] = {}
        for name in unit.layers:
            act = state.plan.layers[name].activation
            if act is None or act.dynamic:
                continue
            if not act.symmetric:
                raise ValueError(f"{name}: static activation scales must be symmetric")
            m = state.model.get_submodule(name)
            if not isinstance(m, QUANTIZED):
                raise ValueError(f"{name} is not quantized; run the weight pass first")
            modules[name] = m
        if not modules:
            return
        if ctx.calibration is None:
            raise ValueError("act_calibration needs calibration tokens (ctx.calibration is None)")
        own = [m for m in unit.module.modules() if isinstance(m, QUANTIZED)]
        saved = [m.activation for m in own]
        for m in own:
            m.activation = None
        elements: dict[str, ElementFormat] = {}
        for n in modules:
            act = state.plan.layers[n].activation
            assert act is not None
            elements[n] = act.element
        try:
            scales = static_scales(state.model, elements, unit.forwards(), self.config)
        finally:
            for m, act in zip(own, saved, strict=True):
                m.activation = act
        record = ctx.records.setdefault(
            "act_calibration", {"observer": self.config.observer, "input_scale": {}}
        )
        for n, m in modules.items():
            s = scales[n].float().reshape(1).to(m.weight.device)
            m.input_scale = s
            m.activation = state.plan.layers[n].activation  # a layer-wise pass left it off
            record["input_scale"][n] = float(s)
