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

Usage::

    .venv/bin/python benchmarks/default_w4a16_smollm2.py [--peer PYTHON] [--only SUBSTR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
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
    "ptq quantize default --w4a16 (defaults: GPTQ, full-range)": [],
    "ptq quantize default --w4a16 --method rtn": ["--method", "rtn"],
    "ptq quantize default --w4a16 --method awq+gptq": ["--method", "awq+gptq"],
}
PEERS = {
    "llm-compressor W4A16 example (group 128)": "w4a16_example",
    "llm-compressor W4A16 example, group 64 where 128 does not divide": "w4a16_example_g64",
}


def timed(cmd: list[str], threads: int) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    return time.perf_counter() - start, proc


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
    rows: list[dict[str, object]] = []
    for label, flags in OURS.items():
        if not selected(a.only, label):
            continue
        out = tmp / f"ptq_{len(rows)}"
        cmd = [str(PTQ), "quantize", "default", "--w4a16", *flags, "-o", str(out), "-q"]
        secs, proc = timed(cmd, a.threads)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], flush=True)
            rows.append({"run": label, "ppl": float("nan"), "seconds": secs, "note": "failed"})
        else:
            model, _ = load_quantized_model(out)
            ppl = perplexity(model.float().eval(), eval_ids, seqlen=512, progress=False)
            plan = json.loads((out / "ptq_plan.json").read_text())
            methods = sorted({lp["method"] for lp in plan["layers"].values()})
            rows.append({"run": label, "ppl": ppl, "seconds": secs, "note": f"method {methods}"})
        write(rows, fp_ppl, header, a.out)
    for label, scheme in PEERS.items():
        if not selected(a.only, label):
            continue
        out = tmp / f"llmc_{scheme}"
        cmd = [a.peer, str(ROOT / "peers" / "llmc_quantize.py"), "--model", str(source.path)]
        cmd += ["--calib", str(tmp / "calib.pt"), "--scheme", scheme, "--method", "gptq"]
        secs, proc = timed([*cmd, "--out", str(out), "--threads", str(a.threads)], a.threads)
        if proc.returncode != 0:
            refused = [ln for ln in proc.stderr.splitlines() if "group_size" in ln]
            note = f"refused: {len(refused)} layers, e.g. `{refused[0].strip()}`" if refused else ""
            print(proc.stderr[-3000:], flush=True)
            rows.append(
                {"run": label, "ppl": float("nan"), "seconds": secs, "note": note or "failed"}
            )
        else:
            ppl = perplexity(load_peer_output(out), eval_ids, seqlen=512, progress=False)
            rows.append({"run": label, "ppl": ppl, "seconds": secs, "note": "GPTQModifier"})
        write(rows, fp_ppl, header, a.out)


if __name__ == "__main__":
    main()
