"""Distributed calibration: batch-ordered reductions, failures that do not hang, and
``torchrun`` runs whose output equals one process bit for bit.

This file is also the worker of the gloo tests (``python this_file ROLE OUT``, with
torchrun's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` in the environment);
workers import torch only, so the reduction tests stay in the default suite.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ptq.calibration.distributed import DistributedContext, DistributedError
from ptq.calibration.hessian import HessianAccumulator
from ptq.calibration.ordered_hessian import OrderedHessian
from ptq.calibration.stages import LayerStats, StatsRequest, _new_stats
from ptq.errors import PtqError

HERE = Path(__file__).resolve()
K, BATCHES, MAX_ROWS = 6, 5, 7
SCALES = (1e3, 1.0, 3e-3, 7e2, 0.02)  # magnitudes far apart: the order of additions shows


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, K, generator=g) * s for s in SCALES]


def _partial(x: torch.Tensor) -> torch.Tensor:
    """One forward's ``X^T X``: a float32 product, folded in float32."""
    part = HessianAccumulator(K, dtype=torch.float32)
    part.update(x)
    assert part._sum is not None
    return part._sum


def _layers() -> list[Any]:
    """Quantized layers to broadcast: NVFP4 (global scale), asymmetric INT4 (zero points)
    with a bias and a NaN in the record, and None (an owner that skipped the layer)."""
    from ptq.formats import quantize
    from ptq.formats.presets import get_preset

    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(5))
    bias = torch.arange(8, dtype=torch.float32)
    return [
        (quantize(w, get_preset("nvfp4")), None, {"rel_output_error": 0.1, "method": "gptq"}),
        (quantize(w, get_preset("int4_g128_asym")), bias, {"loss": math.nan, "steps": 3}),
        None,
    ]


def _fold(xs: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros(K, K, dtype=torch.float32)
    for x in xs:
        total += _partial(x)
    return total


# --------------------------------------------------------------------------- workers


def _worker(role: str, out: Path) -> None:
    """One rank: ``reduce`` (chain 0 -> 1 -> 0, rows gathered on 0); with ``crash`` rank 1
    exits, with ``hang`` it stays silent past the timeout and then exits cleanly."""
    from ptq.calibration.layer_parallel import broadcast_result, reduce_layer_stats

    ctx = DistributedContext.from_env(timeout_s=float(os.environ.get("PTQ_TEST_TIMEOUT", "60")))
    ctx.init()
    mine = ctx.shard(_batches())
    if ctx.rank == 1 and role == "crash":
        sys.exit(3)
    if ctx.rank == 1 and role == "hang":
        time.sleep(ctx.timeout_s + 3)
        sys.exit(0)
    stats = LayerStats(hessian=OrderedHessian(K, defer=True), max_rows=MAX_ROWS)
    for x in mine:
        stats.add(x)
    try:
        reduce_layer_stats({"layer": stats}, {"layer": 0}, ctx)
    except DistributedError as exc:
        out.write_text(str(exc))
        sys.exit(2)
    layers = [broadcast_result(r if ctx.rank == 1 else None, 1, ctx) for r in _layers()]
    if ctx.rank == 0:
        assert stats.hessian is not None
        got = {"h": stats.hessian._sum, "n": stats.hessian.nsamples, "rows": stats.inputs}
        torch.save(got, out)
        _check_layers(layers, out.with_suffix(".layers"))
    else:
        assert stats.hessian is None and stats.inputs == []
    ctx.close()


def _check_layers(got: list[Any], out: Path) -> None:
    """Write ``ok`` when the received layers equal the sent ones field by field."""
    for g, want in zip(got, _layers(), strict=True):
        if want is None:
            assert g is None
            continue
        (q, b, rec), (wq, wb, wrec) = g, want
        assert q.fmt == wq.fmt
        for field in ("codes", "scale", "zero_point", "global_scale", "channel_scale"):
            x, y = getattr(q, field), getattr(wq, field)
            assert (x is None) == (y is None), field
            assert x is None or (x.dtype == y.dtype and torch.equal(x, y)), field
        assert (b is None and wb is None) or torch.equal(b, wb)
        assert json.dumps(rec) == json.dumps(wrec)
    out.write_text("ok")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(role: str, tmp: Path, world: int = 2, timeout_s: float = 60) -> list[int]:
    """Start ``world`` plain worker processes (no torchrun agent to kill the others)."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
            "PTQ_TEST_TIMEOUT": str(timeout_s),
        }
        out = tmp / f"rank{rank}.out"
        procs.append(subprocess.Popen([sys.executable, str(HERE), role, str(out)], env=env))
    return [p.wait(timeout=120) for p in procs]


# --------------------------------------------------------------------------- fast tests


def test_ordered_hessian_is_the_left_fold_of_batch_partials() -> None:
    xs = _batches()
    h = OrderedHessian(K)
    for x in xs:
        h.update(x)
    assert torch.equal(h.hessian(), _fold(xs) * (2.0 / 15))
    # the test can tell orders apart: summing the shards first gives other bits
    assert not torch.equal(_fold(xs[:2]) + _fold(xs[2:]), _fold(xs))


def test_deferred_shard_continues_the_fold() -> None:
    xs = _batches()
    first, second = OrderedHessian(K), OrderedHessian(K, defer=True)
    for x in xs[:2]:
        first.update(x)
    for x in xs[2:]:
        second.update(x)
    with pytest.raises(ValueError, match="before the reduction"):
        second.hessian()
    assert first._sum is not None
    second.continue_from(first._sum.clone(), first.nsamples)
    assert second.nsamples == 15
    assert torch.equal(second.hessian(), _fold(xs) * (2.0 / 15))
    with pytest.raises(TypeError, match="batch order"):
        second.merge(HessianAccumulator(K))


def test_runner_accumulates_dense_hessians_in_batch_order() -> None:
    stats = _new_stats(torch.nn.Linear(K, 3), StatsRequest(hessian=True), 1)
    assert type(stats.hessian) is OrderedHessian and not stats.hessian.defer


def test_broadcast_cases_cover_every_optional_field() -> None:
    nvfp4, asym, skipped = _layers()
    assert nvfp4[0].global_scale is not None and asym[0].zero_point is not None
    assert asym[1] is not None and math.isnan(asym[2]["loss"]) and skipped is None


def test_context_shards_contiguously_and_validates() -> None:
    items = list(range(7))
    shards = [DistributedContext(rank=r, world=3).shard(items) for r in range(3)]
    assert shards == [[0, 1], [2, 3], [4, 5, 6]]
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    ctx = DistributedContext.from_env(env, layer_parallel=False)
    assert (ctx.rank, ctx.world, ctx.is_main) == (1, 2, False)
    assert [ctx.owner(i) for i in range(3)] == [0, 0, 0]
    assert [DistributedContext(world=2).owner(i) for i in range(3)] == [0, 1, 0]
    assert DistributedContext.from_env({}).world == 1
    with pytest.raises(ValueError, match="rank 2 is not in"):
        DistributedContext(rank=2, world=2)
    with pytest.raises(ValueError, match="integers"):
        DistributedContext.from_env({"WORLD_SIZE": "two"})
    with pytest.raises(PtqError, match="2 calibration batches cannot"):
        DistributedContext(rank=0, world=3).shard([1, 2])


def test_two_gloo_ranks_reduce_in_global_batch_order(tmp_path: Path) -> None:
    assert _launch("reduce", tmp_path) == [0, 0]
    got = torch.load(tmp_path / "rank0.out", weights_only=True)
    xs = _batches()
    assert got["n"] == 15
    assert torch.equal(got["h"], _fold(xs))  # bit for bit the one-process fold
    rows = torch.cat([x.float() for x in xs])[:MAX_ROWS]  # 6 rows from rank 0, 1 from rank 1
    assert len(got["rows"]) == 1 and torch.equal(got["rows"][0], rows)
    assert (tmp_path / "rank0.layers").read_text() == "ok"  # broadcast quantized layers


def _failure_message(tmp: Path) -> str:
    message = (tmp / "rank0.out").read_text()
    assert message.startswith("rank 0 of 2: the Hessian reduction failed because another rank")
    return message


def test_a_crashed_rank_does_not_hang_the_others(tmp_path: Path) -> None:
    assert _launch("crash", tmp_path) == [2, 3]  # rank 0 fails at once, not after 60 s
    assert "did not answer within 60 s" in _failure_message(tmp_path)


@pytest.mark.slow  # waits for the 5 s timeout on top of two worker start-ups
def test_a_silent_rank_times_out(tmp_path: Path) -> None:
    assert _launch("hang", tmp_path, timeout_s=5) == [2, 0]
    assert "within 5 s" in _failure_message(tmp_path)


# --------------------------------------------------------------------------- torchrun e2e


def _cli(*args: str, nproc: int = 0) -> None:
    """``ptq quantize`` in one process (``nproc=0``) or under torchrun, one thread each
    (float32 sums in the records depend on the thread count; the weights did not here)."""
    launch = [sys.executable, "-m", "ptq.cli"]
    if nproc:
        launch = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "ptq.cli",
        ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*launch, "quantize", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from ptq.io.safetensors_reader import SafetensorsIndex

    index = SafetensorsIndex(folder)
    return {k: index.get(k) for k in index}


def _records(folder: Path) -> dict[str, Any]:
    layers = json.loads((folder / "ptq_records.json").read_text())["layers"]
    return {n: {k: v for k, v in r.items() if k != "seconds"} for n, r in layers.items()}


@pytest.mark.slow  # two torchrun launches of python + transformers: ~70 s on 2 cores
def test_torchrun_two_processes_equal_one_process(
    tiny_llama: Path, text_file: Path, tmp_path: Path
) -> None:
    common = ["--w4a16", "--method", "gptq", "--calib", str(text_file)]
    common += ["--calib-samples", "40", "--calib-seqlen", "16", "-q"]
    one = tmp_path / "one"
    _cli(str(tiny_llama), *common, "-o", str(one))  # plain `ptq quantize`
    ref, ref_records = _tensors(one), _records(one)
    assert len(ref_records) == 14
    assert all(math.isfinite(r["rel_output_error"]) for r in ref_records.values())
    for mode in ("layer", "data"):
        two = tmp_path / mode
        _cli(str(tiny_llama), *common, "--distributed", mode, "-o", str(two), nproc=2)
        got = _tensors(two)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), (mode, k)
        assert json.dumps(_records(two), sort_keys=True) == json.dumps(ref_records, sort_keys=True)
        assert not list(tmp_path.glob(f".{mode}.partial-*"))


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
