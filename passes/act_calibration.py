"""Static activation calibration: per-layer input scales from calibration data.

For a layer whose plan holds a static (``dynamic=False``) per-tensor activation scheme
the runtime quantizes its input with one fixed scale ``s = r / q_max``, where ``r`` is
the observed input range: the running ``max |x|`` (min-max observer) or the mean over
batches of the ``p``-th percentile of ``|x|`` (percentile observer, which trades a few
clipped outliers for a finer grid). The pass observes the inputs of the already
weight-quantized model with activation quantization switched off, then writes
``QuantLinear.input_scale``.

Also home of the small helpers other passes use to feed calibration tokens through a
model and record per-layer input statistics with forward pre-hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from ptq.pipeline import Pass, PassContext, QuantState
from ptq.qlinear import QuantLinear

if TYPE_CHECKING:
    from ptq.calibration.distributed import DistributedContext


def token_batches(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Rows of ``tokens`` [n, seqlen] in batches of ``batch_size``."""
    if tokens.dim() != 2:
        raise ValueError(f"calibration tokens must be [n, seqlen], got {tuple(tokens.shape)}")
    for i in range(0, tokens.shape[0], batch_size):
        yield tokens[i : i + batch_size]


@torch.no_grad()
def run_calibration(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> None:
    """Forward every calibration batch through ``model`` (outputs are discarded)."""
    for batch in token_batches(tokens, batch_size):
        model(input_ids=batch, use_cache=False)


def observe_inputs(
    model: nn.Module,
    names: list[str],
    tokens: torch.Tensor,
    observe: Callable[[str, torch.Tensor], None],
    batch_size: int = 8,
) -> None:
    """Call ``observe(name, x2d)`` with every calibration input ``x`` of each named module."""
    handles = []
    for name in names:

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0]
            observe(name, x.detach().reshape(-1, x.shape[-1]).float())

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        run_calibration(model, tokens, batch_size)
    finally:
        for h in handles:
            h.remove()


def input_absmax(
    model: nn.Module,
    names: list[str],
    tokens: torch.Tensor,
    *,
    per_channel: bool,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """``max |x|`` of each named module's input, per input channel ``[K]`` or scalar."""
    out: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        a = x.abs().amax(dim=0) if per_channel else x.abs().amax()
        out[name] = a if name not in out else torch.maximum(out[name], a)

    observe_inputs(model, names, tokens, observe, batch_size)
    return out


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
    batch_size: Calibration sequences per forward.
    """

    observer: Literal["minmax", "percentile"] = "minmax"
    percentile: float = 99.99
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.observer not in ("minmax", "percentile"):
            raise ValueError(f"observer must be 'minmax' or 'percentile', not {self.observer!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def static_ranges(
    model: nn.Module,
    names: list[str],
    tokens: torch.Tensor,
    config: ActCalibrationConfig,
    distributed: DistributedContext | None = None,
) -> dict[str, torch.Tensor]:
    """Observed input range ``r`` per named module under ``config.observer``.

    With ``distributed`` (more than one rank) each rank observes its contiguous share of
    the calibration batches and the statistics are all-reduced so that every rank gets
    the single-process result bit for bit: the min-max ranges with ``MAX`` (exact in
    any order), the percentile observer's per-batch values by placing each in its global
    batch slot (a ``SUM`` with zeros elsewhere, exact), then summing in batch order.
    """
    if distributed is not None and distributed.world > 1:
        return _distributed_ranges(model, names, tokens, config, distributed)
    if config.observer == "minmax":
        return input_absmax(model, names, tokens, per_channel=False, batch_size=config.batch_size)
    values = _percentile_values(model, names, tokens, config)
    return {n: _sum_in_order(v) / len(v) for n, v in values.items()}


def _percentile_values(
    model: nn.Module, names: list[str], tokens: torch.Tensor, config: ActCalibrationConfig
) -> dict[str, list[torch.Tensor]]:
    """Per-batch ``p``-th percentile of ``|x|`` per named module, in batch order."""
    values: dict[str, list[torch.Tensor]] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        values.setdefault(name, []).append(percentile_absmax(x, config.percentile))

    observe_inputs(model, names, tokens, observe, config.batch_size)
    return values


def _sum_in_order(values: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(())
    for v in values:
        total = total + v
    return total


def _distributed_ranges(
    model: nn.Module,
    names: list[str],
    tokens: torch.Tensor,
    config: ActCalibrationConfig,
    ctx: DistributedContext,
) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    starts = list(range(0, tokens.shape[0], config.batch_size))
    mine = ctx.shard(starts)
    first = starts.index(mine[0])
    local = tokens[mine[0] : min(mine[-1] + config.batch_size, tokens.shape[0])]
    if config.observer == "minmax":
        part = input_absmax(model, names, local, per_channel=False, batch_size=config.batch_size)
        stacked = torch.stack([part[n].float().reshape(()) for n in names]).to(ctx.device)
        with ctx.collective("reducing activation ranges"):
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
        return {n: stacked[i].cpu() for i, n in enumerate(names)}
    values = _percentile_values(model, names, local, config)
    table = torch.zeros(len(starts), len(names))
    for j, n in enumerate(names):
        for b, v in enumerate(values[n]):
            table[first + b, j] = v
    table = table.to(ctx.device)
    with ctx.collective("reducing activation percentiles"):
        dist.all_reduce(table, op=dist.ReduceOp.SUM)
    table = table.cpu()
    return {n: _sum_in_order(list(table[:, j])) / len(starts) for j, n in enumerate(names)}


class ActCalibrationPass(Pass):
    """Set ``input_scale = r / q_max`` on every QuantLinear with a static activation scheme.

    Runs after the weight pass; activation quantization is switched off while observing
    so the missing scales do not matter, and restored afterwards.
    """

    name: ClassVar[str] = "act_calibration"
    requires: ClassVar[tuple[str, ...]] = ("weights_quantized",)
    ensures: ClassVar[tuple[str, ...]] = ("activations_calibrated",)
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: ActCalibrationConfig | None = None) -> None:
        self.config = config or ActCalibrationConfig()

    def run(self, state: QuantState, ctx: PassContext) -> None:
        if ctx.calibration is None:
            raise ValueError("act_calibration needs calibration tokens (ctx.calibration is None)")
        modules: dict[str, QuantLinear] = {}
        for lp in state.plan:
            act = lp.activation
            if act is None or act.dynamic:
                continue
            if not act.symmetric:
                raise ValueError(f"{lp.name}: static activation scales must be symmetric")
            m = state.model.get_submodule(lp.name)
            if not isinstance(m, QuantLinear):
                raise ValueError(f"{lp.name} is not a QuantLinear; run the weight pass first")
            modules[lp.name] = m
        saved = {
            n: m.activation for n, m in state.model.named_modules() if isinstance(m, QuantLinear)
        }
        for n in saved:
            state.model.get_submodule(n).activation = None  # type: ignore[assignment]
        try:
            ranges = static_ranges(
                state.model, list(modules), ctx.calibration, self.config, ctx.distributed
            )
        finally:
            for n, act in saved.items():
                state.model.get_submodule(n).activation = act  # type: ignore[assignment]
        scales: dict[str, float] = {}
        for n, m in modules.items():
            act = m.activation
            assert act is not None
            r = ranges[n].float()
            s = torch.where(r > 0, r / act.element.max_value, torch.ones_like(r)).reshape(1)
            m.input_scale = s
            scales[n] = float(s)
        ctx.records["act_calibration"] = {"observer": self.config.observer, "input_scale": scales}
