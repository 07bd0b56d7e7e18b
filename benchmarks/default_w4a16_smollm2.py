"""``ptq quantize default --w4a16`` with every default against llm-compressor's W4A16 example.

Both quantize SmolLM2-135M from the same calibration token ids: the ones ``ptq quantize``
draws by default (128 x 512 tokens of the plays, seed 0), saved and handed to
llm-compressor. llm-compressor's W4A16 example recipe is ``GPTQModifier(targets="Linear",
scheme="W4A16", ignore=["lm_head"])``; its group size 128 does not divide SmolLM2's
576-wide inputs, which it refuses (tried first, the refusal is recorded), so it runs again
with the group sizes ptq's preset rule picks (64 where 128 does not divide, 128 for
down_proj), as the same GPTQModifier with two config groups. Perplexity of both outputs is
measured here, reloaded from disk, on ``--eval-tokens`` held-out Britannica tokens in
512-token windows (:func:`ptq.evaluate.perplexity`). Wall time is the whole command as a
user runs it (load, calibrate, quantize, write), each a subprocess with ``--threads``
(default 2) torch threads: ``OMP_NUM_THREADS`` for ``ptq``, ``--threads`` for the peer.
With ``--concurrent`` every selected command starts at once, so ours and the peer's
wall times are taken under the same load (on a shared machine the only fair pairing).

Usage::

    .venv/bin/python benchmarks/default_w4a16_smollm2.py [--peer PYTHON] [--only SUBSTR] \
        [--concurrent]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rounding_smollm2 import load_peer_output
from row_filter import selected

from ptq.calibration.text import calibration_batches
from ptq.evaluate import perplexity, tokenize_eval_text
from ptq.models.paths import default_eval_file
from ptq.models.quantized_loader import load_quantized_model
from ptq.models.source import load_fp_model, resolve_model

ROOT = Path(__file__).resolve().parent
PTQ = Path(sys.executable).parent / "ptq"
OURS = {
    "ptq quantize default --w4a16 (defaults: AWQ+GPTQ, full-range)": [],
    "ptq quantize default --w4a16 --method gptq": ["--method", "gptq"],
    "ptq quantize default --w4a16 --method rtn": ["--method", "rtn"],
}
PEERS = {
    "llm-compressor W4A16 example (group 128)": "w4a16_example",
    "llm-compressor W4A16 example, group 64 where 128 does not divide": "w4a16_example_g64",
}


@dataclass
class Job:
    """One quantization command of the table and, once it ran, its result."""

    label: str
    cmd: list[str]
    out: Path
    peer: bool
    seconds: float = 0.0
    returncode: int = 0
    stderr: str = ""


def run_jobs(jobs: list[Job], threads: int, concurrent: bool) -> None:
    """Run every job's command (all at once with ``concurrent``), timing each from its own
    start to its exit (polled once a second); stderr is kept in ``OUT.log`` beside it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for batch in [jobs] if concurrent else [[j] for j in jobs]:
        running = {}
        for job in batch:
            with job.out.with_suffix(".log").open("w") as log:
                proc = subprocess.Popen(job.cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
            running[id(job)] = (job, proc, time.perf_counter())
        while running:
            time.sleep(1.0)
            for key, (job, proc, start) in list(running.items()):
                if proc.poll() is not None:
                    job.seconds = time.perf_counter() - start
                    job.returncode = proc.returncode
                    job.stderr = job.out.with_suffix(".log").read_text()
                    del running[key]


def write(rows: list[dict[str, object]], fp_ppl: float, header: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# `ptq quantize default --w4a16` against llm-compressor's W4A16 example (SmolLM2-135M)",
        "",
        header,
        "",
        f"FP perplexity: **{fp_ppl:.3f}**",
        "",
        "| run | ppl | vs FP | wall seconds | note |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = float(r["ppl"])  # type: ignore[arg-type]
        lines.append(
            f"| {r['run']} | {ppl:.3f} | {ppl / fp_ppl:.3f} | {float(r['seconds']):.1f} | "  # type: ignore[arg-type]
            f"{r.get('note', '')} |"
        )
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--peer", default="/work/peers/llmc/bin/python")
    ap.add_argument("--only", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrent", action="store_true", help="start every command at once")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "default_w4a16_smollm2.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    source = resolve_model("default", quiet=True)
    fp_model, tok = load_fp_model(source)
    eval_ids = tokenize_eval_text(tok, default_eval_file(), a.eval_tokens)
    fp_ppl = perplexity(fp_model.float().eval(), eval_ids, seqlen=512, progress=False)
    cal = calibration_batches(tok, path=None, n_samples=128, seqlen=512, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="default_w4a16_"))
    torch.save(cal, tmp / "calib.pt")
    header = (
        f"Calibration: `ptq quantize`'s default, {cal.shape[0]} x {cal.shape[1]} tokens of the "
        f"plays (seed 0), the same ids for llm-compressor; eval {eval_ids.numel()} tokens of "
        f"`{default_eval_file().name}`, 512-token windows, outputs reloaded from disk. Wall "
        f"time: the whole command (load, calibrate, quantize, write; {a.threads} threads) on a shared "
        "2-core CPU whose load varied (other jobs ran alongside)."
    )
    jobs = [
        Job(
            label,
            [str(PTQ), "quantize", "default", "--w4a16", *flags, "-q"],
            tmp / f"ptq_{i}",
            False,
        )
        for i, (label, flags) in enumerate(OURS.items())
        if selected(a.only, label)
    ]
    for label, scheme in PEERS.items():
        if selected(a.only, label):
            cmd = [a.peer, str(ROOT / "peers" / "llmc_quantize.py"), "--model", str(source.path)]
            cmd += ["--calib", str(tmp / "calib.pt"), "--scheme", scheme, "--method", "gptq"]
            jobs.append(
                Job(label, [*cmd, "--threads", str(a.threads)], tmp / f"llmc_{scheme}", True)
            )
    for job in jobs:
        job.cmd += ["-o" if not job.peer else "--out", str(job.out)]
    if a.concurrent:
        header += f" The {len(jobs)} commands ran concurrently (same load for each)."
    run_jobs(jobs, a.threads, a.concurrent)
    rows: list[dict[str, object]] = []
    for job in jobs:
        row: dict[str, object] = {"run": job.label, "ppl": float("nan"), "seconds": job.seconds}
        if job.returncode != 0:
            print(job.stderr[-3000:], flush=True)
            refused = [ln for ln in job.stderr.splitlines() if "group_size" in ln]
            row["note"] = (
                f"refused: {len(refused)} layers, e.g. `{refused[0].strip()}`"
                if refused
                else "failed"
            )
        elif job.peer:
            row["ppl"] = perplexity(
                load_peer_output(job.out, a.peer), eval_ids, seqlen=512, progress=False
            )
            row["note"] = "GPTQModifier"
        else:
            model, _ = load_quantized_model(job.out)
            row["ppl"] = perplexity(model.float().eval(), eval_ids, seqlen=512, progress=False)
            plan = json.loads((job.out / "ptq_plan.json").read_text())
            row["note"] = f"method {sorted({lp['method'] for lp in plan['layers'].values()})}"
        rows.append(row)
        write(rows, fp_ppl, header, a.out)


if __name__ == "__main__":
    main()
