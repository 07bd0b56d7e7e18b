"""Data- and layer-parallel calibration over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Data parallel: the calibration batches ``b = 0..B-1`` are split into contiguous shards,
rank ``r`` taking ``[floor(rB/W), floor((r+1)B/W))``; each rank runs only its batches
through the blocks. A layer's Hessian sum ``S = sum_b X_b^T X_b`` (GPTQ, Frantar et al.
2022, section 3) is kept as per-batch partials ``P_b = X_b^T X_b`` (float64) and reduced
in *global batch order*, ``S = (((0 + P_0) + P_1) + ...) + P_{B-1}``, by a chain: rank 0
adds its partials and sends the running sum to rank 1, which adds its own, and so on; the
last rank sends ``S`` (and the exact integer row count) to the layer's owner. Floating-
point addition is not associative, but this order does not depend on the number of
processes, so 1, 2 or N processes give bit-identical Hessians (and outputs) when each
process uses the same number of threads. The first ``max_rows`` cached input rows are
gathered to the owner in the same global order.

Layer parallel: inside a stage (layers fed the same input), layer ``i`` is owned by rank
``i mod W``; the owner quantizes it and broadcasts the :class:`~ptq.formats.QTensor`
(codes, scales, zero point, global/channel scales), the new bias and the layer record
(JSON bytes, never pickle); every other rank installs the same module.

Launch with ``torchrun`` (docs/distributed.md); :meth:`DistributedContext.from_env`
reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ptq.calibration.hessian import HessianAccumulator
from ptq.calibration.runner import LayerStats, StatsRequest, _new_stats
from ptq.formats import QTensor
from ptq.serialization import format_from_dict, format_to_dict

__all__ = [
    "DistributedContext",
    "LayerParallel",
    "OrderedHessian",
    "broadcast_qtensor",
    "broadcast_tensors",
    "reduce_layer_stats",
]

T = TypeVar("T")
InstallFn = Callable[[str, QTensor, torch.Tensor | None, dict[str, Any]], None]
Result = tuple[QTensor, torch.Tensor | None, dict[str, Any]]
_DTYPES: Final = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
)  # fmt: skip
_MAX_DIM: Final = 8


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job: ``rank`` of ``world``, backend and device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "gloo"

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"DistributedContext: rank {self.rank} is not in [0, {self.world})")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"DistributedContext backend must be gloo or nccl, not {self.backend}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistributedContext:
        """From torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (NCCL when CUDA is there)."""
        env = os.environ if env is None else env
        try:
            rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
            local = int(env.get("LOCAL_RANK", "0"))
        except ValueError as exc:
            raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from None
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        return cls(rank=rank, world=world, local_rank=local, backend=backend)

    @property
    def device(self) -> torch.device:
        """Where collective buffers live (the local GPU for NCCL)."""
        return (
            torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        )

    def init(self) -> None:
        """Join the process group (``env://``: torchrun's MASTER_ADDR/PORT); no-op for 1."""
        if self.world == 1 or dist.is_initialized():
            return
        if self.backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(self.backend, rank=self.rank, world_size=self.world)

    def close(self) -> None:
        """Leave the process group if this context joined one."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice ``[floor(rB/W), floor((r+1)B/W))`` of ``items``."""
        n = len(items)
        if n < self.world:
            raise ValueError(f"{n} calibration batches cannot be shared by {self.world} ranks")
        return list(items[n * self.rank // self.world : n * (self.rank + 1) // self.world])

    def owner(self, index: int) -> int:
        """Rank that quantizes the ``index``-th layer of a stage."""
        return index % self.world


class OrderedHessian(HessianAccumulator):
    """A Hessian kept as per-forward partials ``X_b^T X_b`` until :meth:`reduce` sums them
    in global batch order (the order of ranks, then of batches within a rank)."""

    def __init__(self, in_features: int) -> None:
        super().__init__(in_features, dtype=torch.float64)
        self._partials: list[HessianAccumulator] = []
        self._reduced = False

    def update(self, x: torch.Tensor) -> None:
        part = HessianAccumulator(self.in_features, dtype=torch.float64)
        part.update(x)
        if part.nsamples:
            self._partials.append(part)

    def reduce(self, ctx: DistributedContext, owner: int) -> None:
        """Chain-sum the partials over ranks ``0..W-1``; the result lands on ``owner``."""
        k, dev = self.in_features, ctx.device
        total = torch.zeros(k, k, dtype=torch.float64, device=dev)
        count = torch.zeros(1, dtype=torch.int64, device=dev)
        if ctx.rank > 0:
            dist.recv(total, src=ctx.rank - 1)
            dist.recv(count, src=ctx.rank - 1)
        for part in self._partials:
            assert part._sum is not None
            total += part._sum.to(dev)
            count += part.nsamples
        self._partials = []
        last = ctx.world - 1
        if ctx.rank < last:
            dist.send(total, dst=ctx.rank + 1)
            dist.send(count, dst=ctx.rank + 1)
        elif owner != last:
            dist.send(total, dst=owner)
            dist.send(count, dst=owner)
        if ctx.rank == owner and owner != last:
            dist.recv(total, src=last)
            dist.recv(count, src=last)
        if ctx.rank == owner:
            self._sum, self._count = total.cpu(), int(count.item())
        self._reduced = ctx.rank == owner

    def hessian(self) -> torch.Tensor:
        if not self._reduced:
            raise ValueError("OrderedHessian.hessian() before reduce() on the owning rank")
        return super().hessian()


def _gather_rows(stats: LayerStats, ctx: DistributedContext, owner: int) -> None:
    """The first ``max_rows`` input rows in global order, on ``owner``."""
    local = stats.input_rows()
    if ctx.rank != owner:
        dist.send(torch.tensor([local.shape[0]], dtype=torch.int64, device=ctx.device), owner)
        if local.shape[0]:
            dist.send(local.to(ctx.device).contiguous(), owner)
        stats.inputs = []
        return
    parts: list[torch.Tensor] = []
    for src in range(ctx.world):
        if src == owner:
            parts.append(local)
            continue
        n = torch.zeros(1, dtype=torch.int64, device=ctx.device)
        dist.recv(n, src)
        if int(n.item()):
            buf = torch.empty(int(n.item()), local.shape[-1], dtype=local.dtype, device=ctx.device)
            dist.recv(buf, src)
            parts.append(buf.cpu())
    rows = [p for p in parts if p.numel()]
    stats.inputs = [torch.cat(rows)[: stats.max_rows]] if rows else []


def reduce_layer_stats(
    stats: dict[str, LayerStats], owners: Mapping[str, int], ctx: DistributedContext
) -> None:
    """Reduce every layer's Hessian partials and cached rows onto its owner, in ``stats``
    order (identical on every rank), in global batch order."""
    for name, s in stats.items():
        if s.hessian is not None:
            if not isinstance(s.hessian, OrderedHessian):
                raise ValueError(
                    f"layer {name}: distributed calibration needs OrderedHessian statistics "
                    f"(dense layers); got {type(s.hessian).__name__}"
                )
            s.hessian.reduce(ctx, owners[name])
        if s.max_rows > 0 and ctx.world > 1:
            _gather_rows(s, ctx, owners[name])


def broadcast_tensors(
    tensors: Sequence[torch.Tensor | None] | None, count: int, src: int, ctx: DistributedContext
) -> list[torch.Tensor | None]:
    """Broadcast ``count`` optional tensors (any shape, dtypes in ``_DTYPES``) from ``src``."""
    meta = torch.zeros(count, 3 + _MAX_DIM, dtype=torch.int64)
    if ctx.rank == src:
        assert tensors is not None and len(tensors) == count
        for i, t in enumerate(tensors):
            if t is not None:
                if t.dim() > _MAX_DIM or t.dtype not in _DTYPES:
                    raise ValueError(f"cannot broadcast a {t.dtype} tensor of {t.dim()} dims")
                meta[i, :3] = torch.tensor([1, _DTYPES.index(t.dtype), t.dim()])
                meta[i, 3 : 3 + t.dim()] = torch.tensor(t.shape)
    meta = meta.to(ctx.device)
    dist.broadcast(meta, src)
    out: list[torch.Tensor | None] = []
    for i, row in enumerate(meta.cpu().tolist()):
        if not row[0]:
            out.append(None)
            continue
        shape, dtype = row[3 : 3 + row[2]], _DTYPES[row[1]]
        if ctx.rank == src:
            assert tensors is not None and tensors[i] is not None
            buf = tensors[i].detach().to(ctx.device).contiguous()  # type: ignore[union-attr]
        else:
            buf = torch.empty(shape, dtype=dtype, device=ctx.device)
        dist.broadcast(buf, src)
        out.append(buf.cpu())
    return out


def broadcast_qtensor(result: Result | None, src: int, ctx: DistributedContext) -> Result:
    """Broadcast a quantized layer (QTensor, bias, record) from ``src`` to every rank."""
    payload = None
    if ctx.rank == src:
        assert result is not None
        q, b, record = result
        meta = json.dumps({"fmt": format_to_dict(q.fmt), "record": record}, default=str)
        blob = torch.frombuffer(bytearray(meta.encode()), dtype=torch.uint8)
        payload = [q.codes, q.scale, q.zero_point, q.global_scale, q.channel_scale, b, blob]
    got = broadcast_tensors(payload, 7, src, ctx)
    if ctx.rank == src:
        assert result is not None
        return result
    codes, scale, zp, gs, cs, bias, blob_in = got
    assert codes is not None and scale is not None and blob_in is not None
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
    _owners: dict[str, int] = field(default_factory=dict)

    def shard(self, batches: Sequence[T]) -> list[T]:
        return self.ctx.shard(batches)

    def new_stats(self, module: nn.Module, request: StatsRequest, n_batches: int) -> LayerStats:
        stats = _new_stats(module, request, n_batches)
        if stats.hessian is not None:
            if type(stats.hessian) is not HessianAccumulator:
                raise ValueError(
                    f"distributed calibration supports dense layers only, not a "
                    f"{type(stats.hessian).__name__} ({type(module).__name__}); run it in one process"
                )
            stats.hessian = OrderedHessian(stats.hessian.in_features)
        return stats

    def owns(self, stage: list[str], name: str) -> bool:
        return self.ctx.owner(stage.index(name)) == self.ctx.rank

    def check_same(self, stage: list[str]) -> None:
        """Every rank must be at the same stage (else collectives would deadlock)."""
        if self.ctx.world == 1:
            return
        digest = hashlib.sha256("\n".join(stage).encode()).digest()
        mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(self.ctx.device)
        ref = mine.clone()
        dist.broadcast(ref, 0)
        if not torch.equal(ref, mine):
            raise RuntimeError(
                f"rank {self.ctx.rank} reached stage {stage} but rank 0 is at another one; "
                "stage discovery must be deterministic across ranks"
            )

    def reduce(self, stage: list[str], stats: dict[str, LayerStats]) -> None:
        self.check_same(stage)
        owners = {n: self.ctx.owner(i) for i, n in enumerate(stage)}
        reduce_layer_stats({n: stats[n] for n in stage}, owners, self.ctx)

    def sync(self, stage: list[str]) -> None:
        if self.ctx.world == 1:
            return
        for i, name in enumerate(stage):
            src = self.ctx.owner(i)
            got = broadcast_qtensor(self.results.get(name), src, self.ctx)
            if self.ctx.rank != src:
                self.install(name, *got)
