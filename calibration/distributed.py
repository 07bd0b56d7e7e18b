"""A process's place in a ``torch.distributed`` job (gloo on CPU, NCCL on GPU), and the
collectives the data- and layer-parallel runner needs (:mod:`ptq.calibration.layer_parallel`).

Data parallel: the calibration batches ``b = 0..B-1`` are split into contiguous shards,
rank ``r`` taking ``[floor(rB/W), floor((r+1)B/W))``. A layer's Hessian sum
``S = (((0 + P_0) + P_1) + ...) + P_{B-1}`` with ``P_b = X_b^T X_b`` (GPTQ, Frantar et
al. 2022, section 3; :class:`~ptq.calibration.ordered_hessian.OrderedHessian`) is reduced
by a chain in *global batch order*: rank 0 folds its partials into zero and sends the
running sum to rank 1, which folds its own, and so on; the last rank sends ``S`` and the
exact integer row count to the layer's owner. The additions happen in the order one
process would do them, so 1, 2 or N processes give bit-identical Hessians (and outputs),
given the same number of threads per process. An all-reduce would be faster but sums in
an order that depends on ``W``.

Failures: every collective runs under :meth:`DistributedContext.collective`, so a rank
whose peer crashed (gloo: "connection closed") or stopped answering for ``timeout_s``
seconds raises :class:`DistributedError` (one line, exit code 2) instead of hanging.

Launch with ``torchrun`` (docs/distributed.md); :meth:`DistributedContext.from_env`
reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Final, TypeVar

import torch
import torch.distributed as dist

from ptq.calibration.ordered_hessian import OrderedHessian
from ptq.errors import PtqError

__all__ = ["DistributedContext", "DistributedError", "broadcast_tensors", "chain_reduce"]

T = TypeVar("T")
DEFAULT_TIMEOUT_S: Final = 1800.0
_DTYPES: Final = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
)  # fmt: skip
_MAX_DIM: Final = 8


class DistributedError(PtqError):
    """Another rank of the job failed, disagreed or stopped answering."""


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job.

    Attributes:
        rank: This process, ``0 <= rank < world``; rank 0 writes the output.
        world: Number of processes.
        local_rank: Index on this machine (selects the GPU under NCCL).
        backend: ``gloo`` (CPU tensors) or ``nccl`` (collective buffers on GPU
            ``local_rank``).
        layer_parallel: Spread the layers of a stage over the ranks (layer ``i`` on rank
            ``i mod world``); off, rank 0 quantizes every layer (data parallel only).
        timeout_s: How long a collective waits for the other ranks before failing.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "gloo"
    layer_parallel: bool = True
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"DistributedContext: rank {self.rank} is not in [0, {self.world})")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"DistributedContext backend must be gloo or nccl, not {self.backend}")
        if not self.timeout_s > 0:
            raise ValueError(f"DistributedContext timeout_s must be > 0, got {self.timeout_s}")

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        layer_parallel: bool = True,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        backend: str = "gloo",
    ) -> DistributedContext:
        """From torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; rank 0 of 1 outside torchrun.

        ``backend`` is gloo by default because ``ptq quantize`` calibrates on the CPU;
        ``nccl`` suits a model the caller placed on GPU ``LOCAL_RANK`` (one GPU per rank).
        """
        env = os.environ if env is None else env
        try:
            rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
            local = int(env.get("LOCAL_RANK", "0"))
        except ValueError as exc:
            raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from None
        return cls(rank, world, local, backend, layer_parallel, timeout_s)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes the output."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collective buffers live (the local GPU for NCCL)."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def init(self) -> bool:
        """Join the process group (``env://``: torchrun's MASTER_ADDR/PORT).

        Returns:
            True when this call created the group (so :meth:`close` should end it); False
            for one process or a group the caller had already initialised.
        """
        if self.world == 1:
            return False
        if dist.is_initialized():
            if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world):
                raise DistributedError(
                    f"the process group already joined is rank {dist.get_rank()} of "
                    f"{dist.get_world_size()}, not rank {self.rank} of {self.world}"
                )
            return False
        if self.backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        with self.collective("joining the process group"):
            dist.init_process_group(
                self.backend,
                rank=self.rank,
                world_size=self.world,
                timeout=timedelta(seconds=self.timeout_s),
            )
        return True

    def close(self) -> None:
        """Leave the process group."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a collective's failure (peer gone, timeout) into a :class:`DistributedError`."""
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed because another rank "
                f"stopped or did not answer within {self.timeout_s:g} s (that rank's own "
                f"message says why; detail: {first})"
            ) from exc

    def barrier(self, what: str) -> None:
        """Wait for every rank (failing after ``timeout_s``, naming the missing ranks on gloo)."""
        if self.world == 1:
            return
        with self.collective(what):
            if self.backend == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=self.timeout_s))
            else:
                dist.barrier()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous slice ``[floor(rB/W), floor((r+1)B/W))`` of ``items``."""
        n = len(items)
        if n < self.world:
            raise PtqError(
                f"{n} calibration batches cannot be shared by {self.world} ranks; "
                f"use at least {self.world} batches (more --calib-samples) or fewer processes"
            )
        return list(items[n * self.rank // self.world : n * (self.rank + 1) // self.world])

    def owner(self, index: int) -> int:
        """Rank that quantizes the ``index``-th layer of a stage."""
        return index % self.world if self.layer_parallel else 0


def chain_reduce(h: OrderedHessian, ctx: DistributedContext, owner: int) -> bool:
    """Fold every rank's kept partials into one sum, in rank order, onto ``owner``.

    Returns:
        True on ``owner`` (whose ``h`` now holds the whole Hessian), False elsewhere.
    """
    k, dev = h.in_features, ctx.device
    total = torch.zeros(k, k, dtype=torch.float32, device=dev)
    count = torch.zeros(1, dtype=torch.int64, device=dev)
    last = ctx.world - 1
    with ctx.collective("the Hessian reduction"):
        if ctx.rank > 0:
            dist.recv(total, src=ctx.rank - 1)
            dist.recv(count, src=ctx.rank - 1)
        h.continue_from(total, int(count.item()))
        assert h._sum is not None
        total, count = h._sum, torch.tensor([h.nsamples], dtype=torch.int64, device=dev)
        if ctx.rank < last:
            dist.send(total, dst=ctx.rank + 1)
            dist.send(count, dst=ctx.rank + 1)
        elif owner != last:
            dist.send(total, dst=owner)
            dist.send(count, dst=owner)
        if ctx.rank == owner and owner != last:
            dist.recv(total, src=last)
            dist.recv(count, src=last)
    if ctx.rank != owner:
        return False
    h.continue_from(total, int(count.item()))
    return True


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
    out: list[torch.Tensor | None] = []
    with ctx.collective("a broadcast of quantized layers"):
        meta = meta.to(ctx.device)
        dist.broadcast(meta, src)
        for i, row in enumerate(meta.cpu().tolist()):
            if not row[0]:
                out.append(None)
                continue
            shape, dtype = row[3 : 3 + row[2]], _DTYPES[row[1]]
            if ctx.rank == src:
                t = tensors[i] if tensors is not None else None
                assert t is not None
                buf = t.detach().to(ctx.device).contiguous()
            else:
                buf = torch.empty(shape, dtype=dtype, device=ctx.device)
            dist.broadcast(buf, src)
            out.append(buf.cpu())
    return out
