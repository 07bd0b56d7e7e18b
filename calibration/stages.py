"""Stages of a unit's layers, their statistics, and quantizing them in true-sequential order.

Inside a unit (a decoder block, the outer part, or a whole model: :mod:`ptq.calibration.units`)
the planned layers are split into *stages* of layers that consume the same input (q/k/v,
then o, then gate/up, then down). For each stage the unit runs on every calibration
batch with hooks that accumulate the stage's statistics (Hessian ``2 X^T X / n`` or
cached input rows), then the stage's layers are quantized in place, so the next stage
sees them quantized (GPTQ's true-sequential order). Stage forwards stop as early as the
statistics allow and resume from inputs cached at the smallest submodule holding two
consecutive stages.

Calibration data is either ``[n, seqlen]`` token ids (split into batches, fed as
``input_ids``) or a list of model-input dicts (``{"pixel_values": ...}``,
``{"input_ids": ..., "attention_mask": ...}``), each dict one forward. Convolutions
contribute im2col rows (:mod:`ptq.calibration.layer_inputs`). Dense layers' Hessians are
summed forward by forward in batch order (:class:`OrderedHessian`), which is what lets a
data-parallel run (``parallel``, :mod:`ptq.calibration.layer_parallel`) give the same bits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ptq.calibration.blocks import BlockInput, StopForward
from ptq.calibration.hessian import HessianAccumulator
from ptq.calibration.layer_inputs import GroupedHessian, geometry, input_rows, new_hessian
from ptq.calibration.ordered_hessian import OrderedHessian
from ptq.calibration.streams import Spill

if TYPE_CHECKING:
    from ptq.calibration.units import Unit

QuantizeFn = Callable[[str, "LayerStats"], None]
NewStatsFn = Callable[[nn.Module, "StatsRequest", int], "LayerStats"]
Calibration = torch.Tensor | Sequence[Mapping[str, Any]]


@dataclass
class LayerStats:
    """Statistics of one layer's input rows gathered during a stage.

    Layers of one stage read the same tensor, so dense layers with the same input width
    share one Hessian accumulator (q/k/v, gate/up): it is summed once, not per layer.

    ``max_rows`` rows are cached: the first ones seen, or (``rows_per_add > 0``, used
    for convs whose one image gives thousands of correlated patches) a seeded random
    subset of at most ``rows_per_add`` rows from each forward.
    """

    hessian: HessianAccumulator | GroupedHessian | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)
    max_rows: int = 4096
    rows_per_add: int = 0
    generator: torch.Generator | None = None
    owns_hessian: bool = True

    def add(self, x: torch.Tensor) -> None:
        """Add input rows ``x [..., K]`` (every leading index is one row).

        A layer whose ``hessian`` is shared with another layer fed the same tensor
        (``owns_hessian=False``) leaves the update to that layer.
        """
        rows = x.detach().reshape(-1, x.shape[-1])
        if self.hessian is not None and self.owns_hessian:
            self.hessian.update(rows)
        if self.max_rows > 0:
            have = sum(t.shape[0] for t in self.inputs)
            if have < self.max_rows:
                if 0 < self.rows_per_add < rows.shape[0]:
                    gen = self.generator or torch.Generator().manual_seed(0)
                    self.generator = gen
                    pick = torch.randperm(rows.shape[0], generator=gen)[: self.rows_per_add]
                    rows = rows[pick.sort().values.to(rows.device)]
                self.inputs.append(rows[: self.max_rows - have].clone())

    def input_rows(self) -> torch.Tensor:
        return torch.cat(self.inputs) if self.inputs else torch.empty(0)


@dataclass(frozen=True, kw_only=True)
class StatsRequest:
    """What a quantizer needs per layer."""

    hessian: bool = False
    input_rows: int = 0


class StageParallel(Protocol):
    """How a data/layer-parallel job shares a run (:mod:`ptq.calibration.layer_parallel`)."""

    def shard(self, batches: list[Any]) -> list[Any]:
        """This process's calibration batches."""
        ...

    def new_stats(self, module: nn.Module, request: StatsRequest, n_batches: int) -> LayerStats:
        """Per-layer statistics that can be reduced across processes."""
        ...

    def reduce(self, stage: list[str], stats: dict[str, LayerStats]) -> None:
        """Bring each layer's statistics, reduced over all processes, to its owner."""
        ...

    def owns(self, stage: list[str], name: str) -> bool:
        """Whether this process quantizes ``name``."""
        ...

    def sync(self, stage: list[str]) -> None:
        """Give every process the layers the others quantized."""
        ...


def _new_stats(module: nn.Module, request: StatsRequest, n_batches: int = 1) -> LayerStats:
    geo = geometry(module)
    hess: HessianAccumulator | GroupedHessian | None = None
    if request.hessian:
        hess = new_hessian(geo)
        if type(hess) is HessianAccumulator:
            hess = OrderedHessian(geo.in_features)
    per_add = 0
    if geo.kind == "conv" and request.input_rows > 0:
        per_add = -(-request.input_rows // max(n_batches, 1))
    return LayerStats(hessian=hess, max_rows=request.input_rows, rows_per_add=per_add)


def _stages_from_order(order: list[tuple[str, int]], names: list[str]) -> list[list[str]]:
    stages: list[list[str]] = []
    seen_input: dict[int, int] = {}
    for name, key in order:
        if any(name in s for s in stages):
            continue
        if key in seen_input:
            stages[seen_input[key]].append(name)
        else:
            seen_input[key] = len(stages)
            stages.append([name])
    missed = [n for n in names if not any(n in s for s in stages)]
    if missed:
        stages.append(missed)
    return stages


@torch.no_grad()
def _execution_order(
    root: nn.Module, prefix: str, names: list[str], run: Callable[[], Any]
) -> list[tuple[str, int]]:
    order: list[tuple[str, int]] = []
    alive: list[torch.Tensor] = []  # keep inputs alive: a freed tensor's id can be reused
    handles = []
    for name in names:
        module = root.get_submodule(name[len(prefix) :])

        def hook(_m: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
            alive.append(args[0])
            order.append((_name, id(args[0])))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
def discover_stages(
    block: nn.Module, prefix: str, names: list[str], sample: BlockInput
) -> list[list[str]]:
    """Group ``names`` into stages of layers fed the same tensor, in execution order."""

    def run() -> None:
        args = _first_row_kwargs(dict(enumerate(sample.args)))
        block(sample.hidden[:1], *args.values(), **_first_row_kwargs(sample.kwargs))

    return _stages_from_order(_execution_order(block, prefix, names, run), names)


def _first_row_kwargs(kwargs: dict[Any, Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] > 1:
            out[k] = v[:1]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(t[:1] if t.dim() >= 1 and t.shape[0] > 1 else t for t in v)
        else:
            out[k] = v
    return out


@torch.no_grad()
def _collect(
    root: nn.Module,
    names: list[str],
    prefix: str,
    request: StatsRequest,
    run: Callable[[], Any],
    n_batches: int = 1,
    new_stats: NewStatsFn = _new_stats,
    *,
    stop_at_input: bool = False,
) -> dict[str, LayerStats]:
    """Run ``run()`` with hooks that feed each named layer's input rows to its stats.

    ``names`` must be one stage (layers fed the same tensor). With the default
    ``new_stats``, dense layers of equal input width share the first one's Hessian.
    ``stop_at_input``: the first stage layer about to run feeds its input to every
    layer of the stage and stops the forward (raises :class:`StopForward`, which
    ``run`` must suppress per forward) before any stage layer multiplies; only for
    layers whose rows are their input alone (not convolutions, see :func:`_input_only`).
    """
    stats: dict[str, LayerStats] = {}
    shared: dict[int, OrderedHessian] = {}
    handles = []
    for name in names:
        module = root.get_submodule(name[len(prefix) :])
        stats[name] = new_stats(module, request, n_batches)
        hess = stats[name].hessian
        if new_stats is _new_stats and type(hess) is OrderedHessian and not hess.defer:
            width = hess.in_features
            if width in shared:
                stats[name].hessian, stats[name].owns_hessian = shared[width], False
                shared[width].add_reader()
            else:
                shared[width] = hess

        def hook(
            _m: nn.Module, args: tuple[Any, ...], out: Any, _s: LayerStats = stats[name]
        ) -> None:
            _s.add(input_rows(_m, args[0].float(), out))

        def first_input(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].float()
            for layer_stats in stats.values():
                layer_stats.add(x)
            raise StopForward

        handles.append(
            module.register_forward_pre_hook(first_input)
            if stop_at_input
            else module.register_forward_hook(hook)
        )
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return stats


def collect_stage(
    root: nn.Module,
    stage: list[str],
    prefix: str,
    request: StatsRequest,
    forwards: Sequence[Callable[[], Any]],
    new_stats: NewStatsFn = _new_stats,
) -> dict[str, LayerStats]:
    """Statistics of one ``stage`` over ``forwards``; each forward stops as early as the
    statistics allow: before the stage's layers multiply for dense layers, after they
    ran for convolutions (whose rows need the output geometry)."""
    modules = [root.get_submodule(n[len(prefix) :]) for n in stage]
    early = _input_only(modules)
    run = (
        functools.partial(_run_each, forwards)
        if early
        else functools.partial(_run_until, modules, forwards)
    )
    return _collect(
        root, stage, prefix, request, run, len(forwards), new_stats, stop_at_input=early
    )


def split_calibration(calibration: Calibration, batch_size: int) -> list[Any]:
    """Token ids split into batches of ``batch_size`` rows; a list of dicts as given.

    Raises:
        ValueError: Empty calibration data or an element that is not a mapping.
    """
    if isinstance(calibration, torch.Tensor):
        if calibration.numel() == 0:
            raise ValueError("calibration token ids are empty")
        return list(calibration.split(batch_size))
    batches = list(calibration)
    if not batches or not all(isinstance(b, Mapping) for b in batches):
        raise ValueError(
            "calibration must be a tensor of token ids or a non-empty list of model-input dicts"
        )
    return batches


def run_stages(
    unit: Unit,
    request: StatsRequest,
    quantize: QuantizeFn,
    parallel: StageParallel | None = None,
) -> None:
    """Quantize ``unit``'s planned layers stage by stage (true-sequential order).

    Each stage (layers fed the same tensor: q/k/v, o, gate/up, down) collects its
    statistics over the unit's calibration forwards (only this process's shard of them
    under ``parallel``), then ``quantize(name, stats)`` replaces each layer, so later
    stages see the quantized earlier ones. In a block, a stage's forwards start at the
    smallest submodule holding it and the stage before, from inputs cached by that
    stage (:class:`Resume`), and stop as soon as the stage's inputs are known.
    """
    names = unit.layers
    if not names:
        return
    if not (request.hessian or request.input_rows > 0):
        _quantize_stage(names, {n: LayerStats(max_rows=0) for n in names}, quantize, parallel)
        return
    new = _new_stats if parallel is None else parallel.new_stats

    def shard(forwards: list[Callable[[], Any]]) -> list[Callable[[], Any]]:
        return forwards if parallel is None else parallel.shard(forwards)

    if unit.kind == "block":
        stages = discover_stages(unit.module, unit.prefix, names, unit.sample())
        resume: Resume | None = None
        assert unit.calibration is not None
        device = unit.calibration.spill.device
        spills = [Spill(unit.calibration.spill.folder, device, f"resume-{x}-") for x in "ab"]
        for k, stage in enumerate(stages):
            nxt = stages[k + 1] if k + 1 < len(stages) else []
            anchor = _common_parent(unit.module, unit.prefix, stage + nxt) if nxt else None
            forwards: list[Callable[[], Any]]
            if resume is not None:
                forwards = [
                    functools.partial(_resumed, resume, i) for i in range(len(resume.inputs))
                ]
            else:
                forwards = shard(unit.forwards())
            captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
            spill = spills[k % 2]  # the other one holds the inputs these forwards start from
            spill.clear()
            handle = None
            if anchor is not None:
                hook = functools.partial(_keep_inputs, captured, spill)
                handle = anchor.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                stats = collect_stage(unit.module, stage, unit.prefix, request, forwards, new)
            finally:
                if handle is not None:
                    handle.remove()
            _quantize_stage(stage, stats, quantize, parallel)
            if resume is not None:
                resume.spill.clear()
            # Resume only if the anchor ran exactly once per forward (a module called
            # twice would see inputs that depend on its own first call).
            resume = (
                Resume(anchor, captured, spill)
                if anchor is not None and len(captured) == len(forwards)
                else None
            )
        return
    first = unit.forwards()[0]
    order = _execution_order(unit.model, "", names, first)
    for stage in _stages_from_order(order, names):
        stats = collect_stage(unit.model, stage, "", request, shard(unit.forwards()), new)
        _quantize_stage(stage, stats, quantize, parallel)


def _quantize_stage(
    stage: list[str],
    stats: dict[str, LayerStats],
    quantize: QuantizeFn,
    parallel: StageParallel | None,
) -> None:
    if parallel is None:
        for name in stage:
            quantize(name, stats[name])
        return
    parallel.reduce(stage, stats)
    for name in stage:
        if parallel.owns(stage, name):
            quantize(name, stats[name])
    parallel.sync(stage)


@dataclass
class Resume:
    """Where the next stage's forwards start: ``module`` called with cached inputs.

    The module holds the layers of two consecutive stages, so its inputs were computed
    before either stage's layers ran and quantizing the first stage cannot change them;
    the next stage's forwards skip everything before the module (for a Llama block: the
    down_proj stage starts at the MLP, not at the attention).
    """

    module: nn.Module
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]]
    spill: Spill


def _keep_inputs(
    store: list[tuple[tuple[Any, ...], dict[str, Any]]],
    spill: Spill,
    _m: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """Keep a module's inputs; its first (the hidden states) goes to ``spill``."""
    if args and isinstance(args[0], torch.Tensor):
        spill.put(f"{len(store):05d}", args[0])
        args = (args[0].new_empty(args[0].shape, device="meta"), *args[1:])
    store.append((args, dict(kwargs)))


def _resumed(resume: Resume, i: int) -> Any:
    """The resumed module on the ``i``-th kept input."""
    args, kwargs = resume.inputs[i]
    if args and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
        args = (resume.spill.get(f"{i:05d}"), *args[1:])
    return resume.module(*args, **kwargs)


def _common_parent(block: nn.Module, prefix: str, names: list[str]) -> nn.Module | None:
    """The smallest proper submodule of ``block`` holding all ``names`` (None: the block)."""
    paths = [n[len(prefix) :].split(".")[:-1] for n in names]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    if not common or any(len(p) < len(common) for p in paths):
        return None
    return block.get_submodule(".".join(common))


def _input_only(modules: Sequence[nn.Module]) -> bool:
    """Whether the layers' statistic rows are their input alone (no convolution)."""
    return all(geometry(m).kind != "conv" for m in modules)


def _run_each(forwards: Sequence[Callable[[], Any]]) -> None:
    """Call each forward; a :class:`StopForward` ends that forward only."""
    for forward in forwards:
        with contextlib.suppress(StopForward):
            forward()


def _run_until(modules: list[nn.Module], forwards: Sequence[Callable[[], Any]]) -> None:
    """Call each forward, stopping it once every module of ``modules`` has run.

    A stage's statistics are complete once its layers have seen their input, so the rest
    of the block (or model) is skipped: for a Llama block the q/k/v stage stops before
    attention, the o stage before the MLP. The hooks are registered after the
    statistics hooks, so they fire after them.
    """
    fired: set[int] = set()
    want = {id(m) for m in modules}

    def hook(m: nn.Module, _a: tuple[Any, ...], _o: Any) -> None:
        fired.add(id(m))
        if fired >= want:
            raise StopForward

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        for forward in forwards:
            fired.clear()
            with contextlib.suppress(StopForward):
                forward()
    finally:
        for h in handles:
            h.remove()
