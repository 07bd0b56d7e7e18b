"""Block-wise calibration runner: statistics and quantization one block at a time.

For decoder models, calibration batches are run up to block 0 once; then for each block
``i``: (1) the block's planned linears are split into *stages* of layers that consume the
same input (q/k/v, then o, then gate/up, then down: true-sequential order); (2) for each
stage, the block runs on every batch with hooks that accumulate the stage's statistics
(Hessian ``2 X^T X / n`` or cached inputs), then the stage's layers are quantized in
place; (3) the *quantized* block's outputs become block ``i + 1``'s inputs. Only one
block's activations are resident. Models without repeated blocks (CNNs, small encoders)
run as a single stage over the whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.calibration.blocks import BlockInput, capture_block_inputs, find_blocks, run_block
from ptq.calibration.hessian import HessianAccumulator

QuantizeFn = Callable[[str, "LayerStats"], None]


@dataclass
class LayerStats:
    """Statistics of one layer's inputs gathered during a stage."""

    hessian: HessianAccumulator | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)
    max_rows: int = 4096

    def add(self, x: torch.Tensor) -> None:
        if self.hessian is not None:
            self.hessian.update(x)
        if self.max_rows > 0:
            have = sum(t.shape[0] for t in self.inputs)
            if have < self.max_rows:
                rows = x.detach().reshape(-1, x.shape[-1])
                self.inputs.append(rows[: self.max_rows - have].clone())

    def input_rows(self) -> torch.Tensor:
        return torch.cat(self.inputs) if self.inputs else torch.empty(0)


@dataclass(frozen=True, kw_only=True)
class StatsRequest:
    """What a quantizer needs per layer."""

    hessian: bool = False
    input_rows: int = 0


def _new_stats(module: nn.Module, request: StatsRequest) -> LayerStats:
    k = module.weight.shape[1]
    hess = HessianAccumulator(k) if request.hessian else None
    return LayerStats(hessian=hess, max_rows=request.input_rows)


@torch.no_grad()
def discover_stages(
    block: nn.Module, prefix: str, names: list[str], sample: BlockInput
) -> list[list[str]]:
    """Group ``names`` into stages of layers fed the same tensor, in execution order."""
    order: list[tuple[str, int]] = []
    handles = []
    for name in names:
        module = block.get_submodule(name[len(prefix) :])

        def hook(_m: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
            order.append((_name, id(args[0])))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        block(sample.hidden[:1], *sample.args, **_first_row_kwargs(sample.kwargs))
    finally:
        for h in handles:
            h.remove()
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


def _first_row_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
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
) -> dict[str, LayerStats]:
    stats: dict[str, LayerStats] = {}
    handles = []
    for name in names:
        module = root.get_submodule(name[len(prefix) :])
        stats[name] = _new_stats(module, request)

        def hook(_m: nn.Module, args: tuple[Any, ...], _s: LayerStats = stats[name]) -> None:
            _s.add(args[0].float())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return stats


@dataclass
class BlockwiseRunner:
    """Drives a per-layer quantizer over a model, one block (and stage) at a time.

    Args:
        request: Statistics the quantizer needs.
        quantize: Called as ``quantize(layer_name, stats)``; must replace the layer.
        batch_size: Calibration sequences per forward.
        progress: Show a progress bar over blocks.
    """

    request: StatsRequest
    quantize: QuantizeFn
    batch_size: int = 8
    progress: bool = True
    describe: Callable[[], str] | None = None

    @torch.no_grad()
    def run(self, model: nn.Module, layer_names: list[str], calibration: torch.Tensor) -> None:
        batches = list(calibration.split(self.batch_size))
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
                for stage in discover_stages(block, prefix, names, inputs[0]):
                    self._stage(block, prefix, stage, inputs)
                done.update(names)
            outputs = run_block(block, inputs)
            inputs = [replace(x, hidden=o) for x, o in zip(inputs, outputs, strict=True)]
            if self.describe is not None:
                bar.set_postfix_str(self.describe())
        rest = [n for n in layer_names if n not in done]
        if rest:
            self._run_whole(model, rest, batches)

    def _stage(
        self, block: nn.Module, prefix: str, stage: list[str], inputs: list[BlockInput]
    ) -> None:
        if self.request.hessian or self.request.input_rows:
            stats = _collect(block, stage, prefix, self.request, lambda: run_block(block, inputs))
        else:
            stats = {n: LayerStats(max_rows=0) for n in stage}
        for name in stage:
            self.quantize(name, stats[name])

    def _run_whole(self, model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> None:
        def forward_all() -> None:
            for ids in batches:
                model(input_ids=ids, use_cache=False)

        if self.request.hessian or self.request.input_rows:
            stats = _collect(model, names, "", self.request, forward_all)
        else:
            stats = {n: LayerStats(max_rows=0) for n in names}
        for name in names:
            self.quantize(name, stats[name])
