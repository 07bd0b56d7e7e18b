"""Distributed calibration: 2 processes (gloo) give outputs bit-identical to 1 process.

This file is also the torchrun worker (``python -m torch.distributed.run ... this_file
MODEL TEXT OUT THREADS``). The runner and pass subclasses below are the exact edits
proposed for ``calibration/runner.py`` and ``passes/layerwise.py`` (until they land).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ptq.calibration import runner as runner_mod
from ptq.calibration.blocks import BlockInput, run_block
from ptq.calibration.distributed import DistributedContext, LayerParallel, OrderedHessian
from ptq.calibration.hessian import HessianAccumulator
from ptq.calibration.runner import BlockwiseRunner, Calibration, LayerStats, split_calibration
from ptq.formats import QTensor
from ptq.passes.gptq import GPTQPass
from ptq.passes.layerwise import CALIBRATION_BATCH, quantized_module, replace_module
from ptq.pipeline import PassContext, QuantState

HERE = Path(__file__).resolve()


@dataclass
class ParallelRunner(BlockwiseRunner):
    """BlockwiseRunner plus the proposed ``parallel`` hooks."""

    parallel: LayerParallel | None = None

    def run(self, model: nn.Module, layer_names: list[str], calibration: Calibration) -> None:
        assert self.parallel is not None and isinstance(calibration, torch.Tensor)
        mine = self.parallel.shard(split_calibration(calibration, self.batch_size))
        super().run(model, layer_names, torch.cat(mine))

    def _stage(
        self, block: nn.Module, prefix: str, stage: list[str], inputs: list[BlockInput]
    ) -> None:
        assert self.parallel is not None and self._needs_data
        stats = runner_mod._collect(
            block, stage, prefix, self.request, lambda: run_block(block, inputs), len(inputs)
        )
        self.parallel.reduce(stage, stats)
        for name in stage:
            if self.parallel.owns(stage, name):
                self.quantize(name, stats[name])
        self.parallel.sync(stage)


class ParallelGPTQ(GPTQPass):
    """GPTQPass whose ``run`` has the proposed LayerwisePass.run edits."""

    def __init__(self, dctx: DistributedContext) -> None:
        super().__init__()
        self.dctx = dctx

    def run(self, state: QuantState, ctx: PassContext) -> None:
        assert ctx.calibration is not None
        model, plan = state.model, state.plan
        records: dict[str, Any] = ctx.records.setdefault("layers", {})
        results: dict[str, tuple[QTensor, torch.Tensor | None, dict[str, Any]]] = {}

        def install(name: str, qt: QTensor, bias: torch.Tensor | None, rec: dict[str, Any]) -> None:
            records[name] = rec
            layer = model.get_submodule(name)
            new = quantized_module(layer, qt, bias, plan.layers[name].activation)
            replace_module(model, name, new)

        def quantize(name: str, stats: LayerStats) -> None:
            layer = model.get_submodule(name)
            with torch.enable_grad():
                qt, bias, record = self.quantize_layer(name, layer, plan.layers[name], stats, ctx)
            record["method"] = self.name
            new_bias = bias if bias is not None else getattr(layer, "bias", None)
            results[name] = (qt, new_bias, record)
            install(name, qt, new_bias, record)

        parallel = LayerParallel(self.dctx, results, install)
        runner = ParallelRunner(
            request=self.stats_request(),
            quantize=quantize,
            batch_size=CALIBRATION_BATCH,
            progress=False,
            parallel=parallel,
        )
        original = runner_mod._new_stats
        runner_mod._new_stats = parallel.new_stats  # proposed: _collect(new_stats=...)
        try:
            runner.run(model, [lp.name for lp in plan], ctx.calibration)
        finally:
            runner_mod._new_stats = original


@torch.no_grad()
def _execution_order(
    root: nn.Module, prefix: str, names: list[str], run: Callable[[], Any]
) -> list[tuple[str, int]]:
    """runner._execution_order with the proposed fix: keep inputs alive so ids stay unique
    (a freed tensor's id is reused, which merged gate/up into the q/k/v stage on one rank)."""
    order: list[tuple[str, int]] = []
    alive: list[torch.Tensor] = []
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


def worker(model_dir: str, text: str, out: str, threads: int) -> None:
    """One rank: GPTQ w4a16 on ``model_dir``; rank 0 writes ``out``."""
    from ptq.calibration.text import calibration_batches
    from ptq.exporters.safetensors_export import export_compressed_tensors
    from ptq.models.source import load_fp_model, resolve_model
    from ptq.output import atomic_output_dir
    from ptq.plan import build_plan
    from ptq.scheme import get_scheme

    torch.set_num_threads(threads)
    runner_mod._execution_order = _execution_order  # proposed fix, see above
    dctx = DistributedContext.from_env()
    dctx.init()
    try:
        source = resolve_model(model_dir)
        model, tok = load_fp_model(source)
        plan = build_plan(model, get_scheme("w4a16"))
        calib = calibration_batches(tok, path=Path(text), n_samples=24, seqlen=64, seed=0)
        ctx = PassContext(seed=0, progress=False, calibration=calib)
        start = time.perf_counter()
        ParallelGPTQ(dctx).run(QuantState(model=model, plan=plan, tokenizer=tok), ctx)
        if dctx.rank == 0:
            print(f"calibration seconds: {time.perf_counter() - start:.3f}")
            with atomic_output_dir(Path(out)) as tmp:
                export_compressed_tensors(
                    model, plan, source.path, source.config, tmp, records=ctx.records
                )
    finally:
        dctx.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(nproc: int, model: Path, text: Path, out: Path, threads: int) -> float:
    """Run :func:`worker` on ``nproc`` local processes; return the wall time."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), str(HERE), str(model), str(text), str(out),
        str(threads),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return time.perf_counter() - start


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.name != "ptq_records.json"
    }


def _records(folder: Path) -> dict[str, Any]:
    layers = json.loads((folder / "ptq_records.json").read_text())["layers"]
    return {n: {k: v for k, v in r.items() if k != "seconds"} for n, r in layers.items()}


@pytest.mark.slow  # three torchrun launches of python + transformers: ~90 s on 2 cores
def test_two_processes_bit_identical_to_one(
    tiny_llama: Path, text_file: Path, tmp_path: Path
) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(1, tiny_llama, text_file, one, threads=1)
    torchrun(2, tiny_llama, text_file, two, threads=1)
    assert "model.safetensors" in _digests(one)
    assert _digests(one) == _digests(two)
    rec_one, rec_two = _records(one), _records(two)
    assert len(rec_one) == 14
    assert json.dumps(rec_one, sort_keys=True) == json.dumps(rec_two, sort_keys=True)
    assert all(math.isfinite(r["rel_output_error"]) for r in rec_one.values())


def test_ordered_hessian_single_rank_sums_in_order() -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, 5, generator=g) for n in (3, 4, 2)]
    h = OrderedHessian(5)
    for x in xs:
        h.update(x)
    with pytest.raises(ValueError, match="before reduce"):
        h.hessian()
    h.reduce(DistributedContext(), owner=0)
    ref = torch.zeros(5, 5, dtype=torch.float64)
    for x in xs:
        part = HessianAccumulator(5)
        part.update(x)
        assert part._sum is not None
        ref = ref + part._sum
    assert h.nsamples == 9
    assert torch.equal(h.hessian(), ref * (2.0 / 9))


def test_context_shards_contiguously_and_validates() -> None:
    items = list(range(7))
    shards = [DistributedContext(rank=r, world=3).shard(items) for r in range(3)]
    assert shards == [[0, 1], [2, 3], [4, 5, 6]]
    assert DistributedContext.from_env({"RANK": "1", "WORLD_SIZE": "2"}).rank == 1
    with pytest.raises(ValueError, match="rank 2 is not in"):
        DistributedContext(rank=2, world=2)
    with pytest.raises(ValueError, match="2 calibration batches cannot be shared by 3"):
        DistributedContext(rank=0, world=3).shard([1, 2])


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
