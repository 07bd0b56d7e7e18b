"""Static activation observers on SmolLM2-135M: W8A8, INT8 per-tensor static activations.

The same model, weights (INT8 per channel, RTN) and calibration (``--samples`` x
``--seqlen`` tokens of the plays, seed 0) for each observer of ``--act-observer``
(:mod:`ptq.calibration.observers`): ``minmax``, ``percentile`` (99.99th percentile of
``|x|``), ``mse`` and ``kl``; perplexity on ``--eval-tokens`` held-out Britannica tokens in
512-token windows. Seconds are the whole pipeline (RTN + the observed calibration).
The pipeline is what ``ptq quantize default --w8a8 --act-format int8_tensor_static
--act-observer NAME`` runs (:func:`ptq.compose.build_passes`).

Usage::

    .venv/bin/python benchmarks/observers_smollm2.py [--only NAME]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from row_filter import selected

from ptq.calibration.text import calibration_batches
from ptq.compose import build_passes
from ptq.evaluate import perplexity, tokenize_eval_text
from ptq.models.paths import default_eval_file
from ptq.models.source import load_fp_model, resolve_model
from ptq.pipeline import PassContext, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.scheme import get_activation, get_scheme

ROOT = Path(__file__).resolve().parent
OBSERVERS = ("minmax", "percentile", "mse", "kl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "observers_smollm2.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fp_model, tok = load_fp_model(resolve_model("default", quiet=True))
    fp_model = fp_model.float().eval()
    eval_ids = tokenize_eval_text(tok, default_eval_file(), a.eval_tokens)
    cal = calibration_batches(tok, path=None, n_samples=a.samples, seqlen=a.seqlen, seed=0)
    fp_ppl = perplexity(fp_model, eval_ids, seqlen=512, progress=False)
    scheme = get_scheme("w8a8").with_overrides(activation=get_activation("int8_tensor_static"))
    rows: list[dict[str, object]] = []
    for name in OBSERVERS:
        if not selected(a.only, name):
            continue
        model = copy.deepcopy(fp_model)
        passes = build_passes(scheme, method="rtn", act_observer=name)
        ctx = PassContext(calibration=cal, progress=False)
        start = time.perf_counter()
        Pipeline(passes).run(QuantState(model=model, plan=build_plan(model, scheme)), ctx)
        secs = time.perf_counter() - start
        ppl = perplexity(model, eval_ids, seqlen=512, progress=False)
        rows.append({"observer": name, "ppl": ppl, "seconds": secs})
        lines = [
            "# Static activation observers on SmolLM2-135M (W8A8, INT8 per-tensor static)",
            "",
            f"Weights INT8 per channel (RTN); activations INT8, one static scale per layer "
            f"input; calibration {a.samples} x {a.seqlen} tokens of the plays (seed 0); eval "
            f"{eval_ids.numel()} tokens of `{default_eval_file().name}`, 512-token windows; "
            f"{a.threads} threads on a shared 2-core CPU.",
            "",
            f"FP perplexity: **{fp_ppl:.3f}**",
            "",
            "| `--act-observer` | ppl | vs FP | seconds |",
            "|---|---|---|---|",
        ]
        for r in rows:
            p = float(r["ppl"])  # type: ignore[arg-type]
            lines.append(
                f"| {r['observer']} | {p:.3f} | {p / fp_ppl:.3f} | {float(r['seconds']):.1f} |"  # type: ignore[arg-type]
            )
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(lines) + "\n")
        a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
