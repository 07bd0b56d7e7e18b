"""GPTQ W4A16 on SmolLM2-135M: one process against ``torchrun`` data+layer parallel (gloo).

Runs the real command line three times with the same calibration (default text,
``--calib-samples`` x ``--calib-seqlen`` tokens, seed 0):

1. ``ptq quantize`` in one process with the default thread count (all cores),
2. the same with one thread (the strict reference: same threads per process as 3),
3. ``torchrun --nproc-per-node N -m ptq.cli quantize`` (gloo, one thread per process).

For each it prints the wall time (process start to exit, imports and model loading
included), the run's own ``done in`` time, the sha256 of ``model.safetensors`` and
whether it equals run 2, with the load average before and after (the machine may be
shared), then the ratio of run 1 (and run 2) to run 3. The table goes to
``benchmarks/results/distributed_smollm2.md``.

Usage::

    .venv/bin/python benchmarks/distributed_smollm2.py [--samples 32] [--seqlen 256] [--nproc 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ptq.models.source import resolve_model

RESULTS = Path(__file__).resolve().parent / "results" / "distributed_smollm2.md"


@dataclass(frozen=True)
class Run:
    label: str
    processes: int
    threads: str
    wall_s: float
    done_s: float
    sha256: str
    load_before: str
    load_after: str


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(label: str, nproc: int, threads: int | None, args: list[str], out: Path) -> Run:
    cmd = [sys.executable, "-m", "ptq.cli"]
    if nproc > 1:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "ptq.cli",
        ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    before = _load()
    start = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "quantize", *args, "-o", str(out)], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{label} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    done = re.findall(r"done in ([0-9.]+) s", proc.stdout)
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    n_threads = str(threads) if threads is not None else f"default ({os.cpu_count()} cores)"
    return Run(label, nproc, n_threads, wall, float(done[0]), digest, before, _load())


def _table(runs: list[Run], ref: Run, header: str) -> str:
    lines = [
        header,
        "",
        "| run | processes | threads each | wall (s) | `done in` (s) | model.safetensors sha256 "
        "| = 1 proc x 1 thread | load avg before / after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        same = "yes" if r.sha256 == ref.sha256 else "NO"
        lines.append(
            f"| {r.label} | {r.processes} | {r.threads} | {r.wall_s:.1f} | {r.done_s:.1f} "
            f"| `{r.sha256[:16]}` | {same} | {r.load_before} / {r.load_after} |"
        )
    par = runs[-1]
    lines.append("")
    for r in runs[:-1]:
        lines.append(
            f"{r.label} / {par.label}: wall x{r.wall_s / par.wall_s:.2f}, "
            f"`done in` x{r.done_s / par.done_s:.2f} (> 1: the parallel run was faster)"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args()
    model = str(resolve_model(opts.model, quiet=True).path)  # convert once, before any rank
    args = [model, "--w4a16", "--method", "gptq", "-q", "--seed", "0"]
    args += ["--calib-samples", str(opts.samples), "--calib-seqlen", str(opts.seqlen)]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="ptq-dist-bench-") as tmp:
        plan = [
            ("1 process", 1, None),
            ("1 process, 1 thread", 1, 1),
            (f"torchrun {opts.nproc} processes (gloo)", opts.nproc, 1),
        ]
        for i, (label, nproc, threads) in enumerate(plan):
            runs.append(_run(label, nproc, threads, args, Path(tmp) / f"run{i}"))
            print(f"{label}: {runs[-1].wall_s:.1f} s", flush=True)
    header = (
        f"GPTQ W4A16 (act-order, static groups) on SmolLM2-135M, calibration "
        f"{opts.samples} x {opts.seqlen} tokens, {os.cpu_count()} CPU cores"
    )
    text = _table(runs, runs[1], header)
    print(text)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(f"# Distributed calibration on SmolLM2-135M\n\n{text}")


if __name__ == "__main__":
    main()
