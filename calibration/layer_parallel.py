"""Data- and layer-parallel hooks for the block-wise runner (``BlockwiseRunner.parallel``).

Each rank runs only its shard of the calibration batches through the blocks
(:meth:`~ptq.calibration.distributed.DistributedContext.shard`). After a stage's
statistics are collected, every layer's Hessian partials are chain-reduced in global
batch order onto the layer's owner (:func:`~ptq.calibration.distributed.chain_reduce`)
and the first ``max_rows`` cached input rows are gathered there in the same order.
Inside a stage (layers fed the same input), layer ``i`` is owned by rank ``i mod W``
(rank 0 when layer parallelism is off); the owner quantizes it and broadcasts the
:class:`~ptq.formats.QTensor` (codes, scales, zero point, global/channel scales), the
new bias and the layer record (JSON bytes, never pickle); every other rank installs the
same module, so all ranks enter the next stage with identical weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ptq.calibration.distributed import (
    DistributedContext,
    DistributedError,
    broadcast_tensors,
    chain_reduce,
)
from ptq.calibration.ordered_hessian import OrderedHessian
from ptq.calibration.stages import LayerStats, StatsRequest, _new_stats
from ptq.errors import PtqUsageError
from ptq.formats import QTensor
from ptq.serialization import format_from_dict, format_to_dict

__all__ = ["LayerParallel", "broadcast_result", "reduce_layer_stats"]

T = TypeVar("T")
Result = tuple[QTensor, torch.Tensor | None, dict[str, Any]]
InstallFn = Callable[[str, QTensor, torch.Tensor | None, dict[str, Any]], None]


def _gather_rows(stats: LayerStats, ctx: DistributedContext, owner: int) -> None:
    """The first ``max_rows`` input rows in global order, on ``owner``."""
    local = stats.input_rows().float()
    parts: list[torch.Tensor] = []
    with ctx.collective("gathering calibration rows"):
        if ctx.rank != owner:
            width = local.shape[-1] if local.numel() else 0
            head = torch.tensor([local.shape[0] if width else 0, width], dtype=torch.int64)
            dist.send(head.to(ctx.device), owner)
            if width:
                dist.send(local.to(ctx.device).contiguous(), owner)
            stats.inputs = []
            return
        for src in range(ctx.world):
            if src == owner:
                parts.append(local)
                continue
            head = torch.zeros(2, dtype=torch.int64, device=ctx.device)
            dist.recv(head, src)
            n, width = head.tolist()
            if n:
                buf = torch.empty(n, width, dtype=torch.float32, device=ctx.device)
                dist.recv(buf, src)
                parts.append(buf)
    device = local.device if local.numel() else ctx.device
    rows = [p.to(device) for p in parts if p.numel()]
    stats.inputs = [torch.cat(rows)[: stats.max_rows]] if rows else []


def reduce_layer_stats(
    stats: Mapping[str, LayerStats], owners: Mapping[str, int], ctx: DistributedContext
) -> None:
    """Reduce every layer's Hessian and cached rows onto its owner, in ``stats`` order
    (identical on every rank) and in global batch order; non-owners drop theirs."""
    for name, s in stats.items():
        if s.hessian is not None:
            if not isinstance(s.hessian, OrderedHessian):
                raise PtqUsageError(
                    f"layer {name}: distributed calibration needs batch-ordered Hessians "
                    f"(dense layers); got a {type(s.hessian).__name__}; run it in one process"
                )
            if not chain_reduce(s.hessian, ctx, owners[name]):
                s.hessian = None
        if s.max_rows > 0 and ctx.world > 1:
            _gather_rows(s, ctx, owners[name])


def broadcast_result(result: Result | None, src: int, ctx: DistributedContext) -> Result | None:
    """Broadcast a quantized layer (QTensor, bias, record) from ``src`` to every rank;
    ``None`` (the owner skipped an already quantized layer) reaches everyone as ``None``."""
    payload: list[torch.Tensor | None] | None = None
    if ctx.rank == src:
        payload = [None] * 7
        if result is not None:
            q, b, record = result
            meta = json.dumps({"fmt": format_to_dict(q.fmt), "record": record}, default=str)
            blob = torch.frombuffer(bytearray(meta.encode()), dtype=torch.uint8)
            payload = [q.codes, q.scale, q.zero_point, q.global_scale, q.channel_scale, b, blob]
    got = broadcast_tensors(payload, 7, src, ctx)
    if ctx.rank == src:
        return result
    codes, scale, zp, gs, cs, bias, blob_in = got
    if codes is None or scale is None or blob_in is None:
        return None
    meta_in = json.loads(bytes(blob_in.tolist()).decode())
    q = QTensor(codes, scale, format_from_dict(meta_in["fmt"]), zp, gs, cs)
    return q, bias, meta_in["record"]


@dataclass
class LayerParallel:
    """The runner's hooks for data- and layer-parallel calibration (see module docstring).

    Args:
        ctx: This process's rank and world.
        results: Filled by the pass as it quantizes: ``name -> (qtensor, bias, record)``.
        install: How a received result becomes this rank's module (and record).
    """

    ctx: DistributedContext
    results: dict[str, Result]
    install: InstallFn

    def shard(self, batches: Sequence[T]) -> list[T]:
        return self.ctx.shard(batches)

    def new_stats(self, module: nn.Module, request: StatsRequest, n_batches: int) -> LayerStats:
        """Statistics whose reduction is order-exact: deferred ordered Hessians, first rows."""
        stats = _new_stats(module, request, n_batches)
        if stats.hessian is not None:
            if not isinstance(stats.hessian, OrderedHessian):
                raise PtqUsageError(
                    f"distributed calibration supports dense layers only, not a "
                    f"{type(stats.hessian).__name__} ({type(module).__name__}); "
                    "run it in one process"
                )
            stats.hessian = OrderedHessian(stats.hessian.in_features, defer=True)
        if stats.rows_per_add > 0:
            raise PtqUsageError(
                f"distributed calibration cannot sample {type(module).__name__} input rows "
                "as one process does (random patches per forward); run it in one process"
            )
        return stats

    def owns(self, stage: list[str], name: str) -> bool:
        return self.ctx.owner(stage.index(name)) == self.ctx.rank

    def check_same(self, stage: list[str]) -> None:
        """Every rank must be at the same stage (else collectives would pair up wrongly)."""
        digest = hashlib.sha256("\n".join(stage).encode()).digest()
        mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(self.ctx.device)
        ref = mine.clone()
        with self.ctx.collective("checking that all ranks are at the same stage"):
            dist.broadcast(ref, 0)
        if not torch.equal(ref, mine):
            raise DistributedError(
                f"rank {self.ctx.rank} reached stage {stage} but rank 0 is at another one; "
                "stage discovery must be deterministic across ranks"
            )

    def reduce(self, stage: list[str], stats: dict[str, LayerStats]) -> None:
        self.check_same(stage)
        owners = {n: self.ctx.owner(i) for i, n in enumerate(stage)}
        reduce_layer_stats({n: stats[n] for n in stage}, owners, self.ctx)

    def sync(self, stage: list[str]) -> None:
        for i, name in enumerate(stage):
            src = self.ctx.owner(i)
            got = broadcast_result(self.results.pop(name, None), src, self.ctx)
            if self.ctx.rank != src and got is not None:
                self.install(name, *got)
