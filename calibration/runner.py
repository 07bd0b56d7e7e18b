"""Block-wise calibration runner: statistics and quantization one block at a time.

For decoder models (and encoders with a ``ModuleList`` of layers), calibration batches
are run up to block 0 once; then for each block ``i``: (1) the block's planned layers
are split into *stages* of layers that consume the same input (q/k/v, then o, then
gate/up, then down: true-sequential order); (2) for each stage, the block runs on every
batch with hooks that accumulate the stage's statistics (Hessian ``2 X^T X / n`` or
cached input rows), then the stage's layers are quantized in place; (3) the *quantized*
block's outputs become block ``i + 1``'s inputs. Only one block's activations are
resident. Models without repeated blocks (CNNs) are one block: the whole model, staged
the same way, each stage's forward stopping once its layers ran.

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
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.calibration.blocks import (
    BlockInput,
    StopForward,
    capture_block_inputs,
    find_blocks,
    forward_batch,
    run_block,
)
from ptq.calibration.hessian import HessianAccumulator
from ptq.calibration.layer_inputs import GroupedHessian, geometry, input_rows, new_hessian
from ptq.calibration.ordered_hessian import OrderedHessian

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
    shared: dict[int, HessianAccumulator] = {}
    handles = []
    for name in names:
        module = root.get_submodule(name[len(prefix) :])
        stats[name] = new_stats(module, request, n_batches)
        hess = stats[name].hessian
        if new_stats is _new_stats and type(hess) is OrderedHessian and not hess.defer:
            width = hess.in_features
            if width in shared:
                stats[name].hessian, stats[name].owns_hessian = shared[width], False
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


@dataclass
class BlockwiseRunner:
    """Drives a per-layer quantizer over a model, one block (and stage) at a time.

    Args:
        request: Statistics the quantizer needs.
        quantize: Called as ``quantize(layer_name, stats)``; must replace the layer.
        batch_size: Calibration sequences per forward (token-id calibration only).
        progress: Show a progress bar over blocks.
        describe: Text for the progress bar after each block.
        parallel: Data/layer-parallel hooks: this process runs only its shard of the
            batches, each stage's statistics are reduced to the layer owners, which
            quantize their layers, and the results are shared before the next stage.
    """

    request: StatsRequest
    quantize: QuantizeFn
    batch_size: int = 8
    progress: bool = True
    describe: Callable[[], str] | None = None
    parallel: StageParallel | None = None

    @property
    def _needs_data(self) -> bool:
        return self.request.hessian or self.request.input_rows > 0

    def _collect_stats(
        self,
        root: nn.Module,
        stage: list[str],
        prefix: str,
        forwards: Sequence[Callable[[], Any]],
    ) -> dict[str, LayerStats]:
        if not self._needs_data:
            return {name: LayerStats(max_rows=0) for name in stage}
        new = _new_stats if self.parallel is None else self.parallel.new_stats
        return collect_stage(root, stage, prefix, self.request, forwards, new)

    def _quantize_stage(self, stage: list[str], stats: dict[str, LayerStats]) -> None:
        if self.parallel is None:
            for name in stage:
                self.quantize(name, stats[name])
            return
        self.parallel.reduce(stage, stats)
        for name in stage:
            if self.parallel.owns(stage, name):
                self.quantize(name, stats[name])
        self.parallel.sync(stage)

    @torch.no_grad()
    def run(self, model: nn.Module, layer_names: list[str], calibration: Calibration) -> None:
        batches = split_calibration(calibration, self.batch_size)
        if self.parallel is not None:
            batches = self.parallel.shard(batches)
        found = find_blocks(model)
        if found is None:
            self._run_whole(model, layer_names, batches)
            return
        path, blocks = found
        inputs = capture_block_inputs(model, blocks[0], batches)
        done: set[str] = set()
        bar = tqdm(range(len(blocks)), desc="blocks", disable=not self.progress, unit="block")
        for i in bar:
            block = blocks[i]
            prefix = f"{path}.{i}."
            names = [n for n in layer_names if n.startswith(prefix)]
            if names:
                stages = discover_stages(block, prefix, names, inputs[0])
                resume: Resume | None = None
                for k, stage in enumerate(stages):
                    nxt = stages[k + 1] if k + 1 < len(stages) else []
                    anchor = _common_parent(block, prefix, stage + nxt) if nxt else None
                    resume = self._stage(block, prefix, stage, inputs, resume, anchor)
                done.update(names)
            outputs = run_block(block, inputs)
            inputs = [replace(x, hidden=o) for x, o in zip(inputs, outputs, strict=True)]
            if self.describe is not None:
                bar.set_postfix_str(self.describe())
        rest = [n for n in layer_names if n not in done]
        if rest:
            self._run_whole(model, rest, batches)

    def _stage(
        self,
        block: nn.Module,
        prefix: str,
        stage: list[str],
        inputs: list[BlockInput],
        resume: Resume | None = None,
        anchor: nn.Module | None = None,
    ) -> Resume | None:
        """Collect ``stage``'s statistics and quantize it.

        ``resume``: start each forward at a submodule with inputs cached by the previous
        stage instead of at the block. ``anchor``: the submodule holding this stage and
        the next one; its inputs are cached here and returned for the next stage.
        """
        if resume is not None:
            forwards = [functools.partial(resume.module, *a, **kw) for a, kw in resume.inputs]
        else:
            forwards = [functools.partial(_block_forward, block, x) for x in inputs]
        captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        handle = None
        if anchor is not None:
            hook = functools.partial(_keep_inputs, captured)
            handle = anchor.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            stats = self._collect_stats(block, stage, prefix, forwards)
        finally:
            if handle is not None:
                handle.remove()
        self._quantize_stage(stage, stats)
        # Resume only if the anchor ran exactly once per forward (a module called twice
        # would see inputs that depend on its own first call).
        if anchor is None or len(captured) != len(forwards):
            return None
        return Resume(anchor, captured)

    def _run_whole(self, model: nn.Module, names: list[str], batches: list[Any]) -> None:
        """The whole model as one block: stages in execution order, quantized in turn."""
        if not self._needs_data:
            self._quantize_stage(names, {n: LayerStats(max_rows=0) for n in names})
            return
        order = _execution_order(model, "", names, lambda: forward_batch(model, batches[0]))
        stages = _stages_from_order(order, names)
        bar = tqdm(stages, desc="stages", disable=not self.progress or len(stages) < 2)
        for stage in bar:
            forwards = [functools.partial(forward_batch, model, b) for b in batches]
            self._quantize_stage(stage, self._collect_stats(model, stage, "", forwards))
            if self.describe is not None:
                bar.set_postfix_str(self.describe())


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


def _keep_inputs(
    store: list[tuple[tuple[Any, ...], dict[str, Any]]],
    _m: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    store.append((args, dict(kwargs)))


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


def _block_forward(block: nn.Module, x: BlockInput) -> Any:
    return block(x.hidden, *x.args, **x.kwargs)


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
