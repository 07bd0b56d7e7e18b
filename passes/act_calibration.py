"""Static activation calibration: per-layer input scales from calibration data.

For a layer whose plan holds a static (``dynamic=False``) per-tensor activation scheme
the runtime quantizes its input with one fixed scale ``s = r / q_max``, where ``r`` is
the observed input range: the running ``max |x|`` (min-max observer) or the mean over
batches of the ``p``-th percentile of ``|x|`` (percentile observer, which trades a few
clipped outliers for a finer grid). On each unit of the block-wise runner the pass
observes the inputs of the unit's already weight-quantized layers (activation
quantization of this unit switched off; earlier blocks are fully quantized, scales
included, as the runtime will run them), then writes ``QuantLinear.input_scale``.
Every process of a ``torchrun`` job observes every batch, so the scales are the same
on all ranks.

Also home of :func:`observe_inputs`, which other passes use to record per-layer input
statistics over a unit's forwards with forward pre-hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ptq.pipeline import Pass, PassContext, QuantState
from ptq.qlinear import QuantLinear


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


def percentile_absmax(x: torch.Tensor, p: float) -> torch.Tensor:
    """The ``p``-th percentile (0 < p <= 100) of ``|x|`` (nearest-rank)."""
    a = x.abs().reshape(-1)
    k = max(1, min(a.numel(), round(p / 100.0 * a.numel())))
    return a.kthvalue(k).values


@dataclass(frozen=True, kw_only=True)
class ActCalibrationConfig:
    """Args:
    observer: ``minmax`` (running max of ``|x|``) or ``percentile``.
    percentile: Percentile of ``|x|`` per batch, averaged over batches.
    """

    observer: Literal["minmax", "percentile"] = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.observer not in ("minmax", "percentile"):
            raise ValueError(f"observer must be 'minmax' or 'percentile', not {self.observer!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")


def static_ranges(
    model: nn.Module,
    names: list[str],
    forwards: Sequence[Callable[[], Any]],
    config: ActCalibrationConfig,
) -> dict[str, torch.Tensor]:
    """Observed input range ``r`` per named module under ``config.observer``.

    Min-max: the running ``max |x|``. Percentile: each forward's ``p``-th percentile of
    ``|x|``, summed in batch order and averaged.
    """
    if config.observer == "minmax":
        top: dict[str, torch.Tensor] = {}

        def observe_max(name: str, x: torch.Tensor) -> None:
            a = x.abs().amax()
            top[name] = a if name not in top else torch.maximum(top[name], a)

        observe_inputs(model, names, forwards, observe_max)
        return top
    values: dict[str, list[torch.Tensor]] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        values.setdefault(name, []).append(percentile_absmax(x, config.percentile))

    observe_inputs(model, names, forwards, observe)
    return {n: _sum_in_order(v) / len(v) for n, v in values.items()}


def _sum_in_order(values: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros((), device=values[0].device)
    for v in values:
        total = total + v
    return total


class ActCalibrationPass(Pass):
    """Set ``input_scale = r / q_max`` on every QuantLinear with a static activation scheme.

    Runs after the weight pass; the unit's activation quantization is switched off while
    observing so the missing scales do not matter, and restored afterwards.
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
        modules: dict[str, QuantLinear] = {}
        for name in unit.layers:
            act = state.plan.layers[name].activation
            if act is None or act.dynamic:
                continue
            if not act.symmetric:
                raise ValueError(f"{name}: static activation scales must be symmetric")
            m = state.model.get_submodule(name)
            if not isinstance(m, QuantLinear):
                raise ValueError(f"{name} is not a QuantLinear; run the weight pass first")
            modules[name] = m
        if not modules:
            return
        if ctx.calibration is None:
            raise ValueError("act_calibration needs calibration tokens (ctx.calibration is None)")
        own = [m for m in unit.module.modules() if isinstance(m, QuantLinear)]
        saved = [m.activation for m in own]
        for m in own:
            m.activation = None
        try:
            ranges = static_ranges(state.model, list(modules), unit.forwards(), self.config)
        finally:
            for m, act in zip(own, saved, strict=True):
                m.activation = act
        record = ctx.records.setdefault(
            "act_calibration", {"observer": self.config.observer, "input_scale": {}}
        )
        for n, m in modules.items():
            act = m.activation
            assert act is not None
            r = ranges[n].float()
            s = torch.where(r > 0, r / act.element.max_value, torch.ones_like(r)).reshape(1)
            m.input_scale = s
            record["input_scale"][n] = float(s)
