"""Rounding methods on SmolLM2-135M: RTN, AWQ, GPTQ, AdaRound, AdaQuant vs llm-compressor.

One run, same data for every row: calibration ``--samples`` x ``--seqlen`` token ids of
the default text (seed 0), perplexity on ``--eval-tokens`` held-out tokens
(``ptq.models.paths.default_eval_file()``) in 512-token windows with
:func:`ptq.evaluate.perplexity`. Weight-only formats: INT4 symmetric g64, INT4
per-channel, INT3 g64, NVFP4 (SmolLM2 ships on an asymmetric INT4 g32 grid, so that
format would show no error). llm-compressor's GPTQ, RTN (QuantizationModifier) and AWQ
(AWQModifier, then its RTN QuantizationModifier) run in
a subprocess with the peer venv (``benchmarks/peers/llmc_quantize.py``) on the *same*
token ids; their checkpoints are reloaded here (``CompressedTensorsConfig(
run_compressed=False)``, fp32) and evaluated with the same function. Wall time is of the
quantization step only: our ``Pipeline.run`` vs llm-compressor's ``oneshot``.
"+ MSE clip" rows search each group's clip ratio for the least squared weight error
(``QuantFormat(clip="mse")``); for GPTQ that fixes the static scales before the sweep,
for AdaRound the fixed scales it learns the rounding for. "+ stats tuning" rows refit each
layer's per-channel output gain and mean to the FP layer afterwards (``--stats-tuning``).
"span" rows use compressed-tensors' scale rule ``amax / ((q_max - q_min) / 2)``, the rule
llm-compressor's rows use; "full-range" rows ptq's default for INT4 (``v* / -2^(b-1)``).
"AWQ" is AWQ's scales and clipping then RTN (``--method awq``), "AWQ+GPTQ" then GPTQ.

Usage::

    .venv/bin/python benchmarks/rounding_smollm2.py [--only SUBSTR] [--peer PYTHON]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from row_filter import selected
from torch import nn

from ptq.calibration.text import calibration_batches
from ptq.evaluate import perplexity, tokenize_eval_text
from ptq.formats import QuantFormat
from ptq.formats.presets import get_preset
from ptq.models.paths import default_eval_file
from ptq.models.source import load_fp_model, resolve_model
from ptq.passes.adaptive import AdaQuantPass, AdaRoundPass
from ptq.passes.awq import AWQPass
from ptq.passes.bias_correction import BiasCorrectionConfig, BiasCorrectionPass
from ptq.passes.gptq import GPTQPass, GPTQPassConfig
from ptq.passes.rtn import RTNPass
from ptq.pipeline import Pass, PassContext, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.scheme import Scheme

ROOT = Path(__file__).resolve().parent
STATS_TUNING = BiasCorrectionConfig(activation_quantized_only=False, gain=True)
FORMATS: dict[str, QuantFormat] = {
    "int4_g64": get_preset("int4_g64"),
    "int4_channel": get_preset("int4_channel"),
    "int3_g64": get_preset("int3_g64"),
    "nvfp4": get_preset("nvfp4"),
    "int8_channel": get_preset("int8_channel"),
}
OURS: dict[str, Callable[[], Pass | list[Pass]]] = {
    "RTN": RTNPass,
    "GPTQ (no act-order)": lambda: GPTQPass(GPTQPassConfig(act_order=False)),
    "GPTQ act-order": GPTQPass,  # ptq's default: act-order with static groups
    "AdaRound": AdaRoundPass,
    "AdaQuant": AdaQuantPass,
    "RTN + MSE clip": RTNPass,
    "GPTQ act-order + MSE clip": GPTQPass,
    "AdaRound + MSE clip": AdaRoundPass,
    "RTN full-range": RTNPass,
    "GPTQ act-order full-range": GPTQPass,
    "RTN + stats tuning": lambda: BiasCorrectionPass(RTNPass(), STATS_TUNING),
    "GPTQ act-order + stats tuning": lambda: BiasCorrectionPass(GPTQPass(), STATS_TUNING),
    "RTN span": RTNPass,
    "GPTQ act-order span": GPTQPass,
    "AWQ span": lambda: [AWQPass(), RTNPass()],
    "AWQ full-range": lambda: [AWQPass(), RTNPass()],
    "AWQ+GPTQ full-range": lambda: [AWQPass(), GPTQPass()],
}


# Methods that change the format's scale choice (RTN and GPTQ's static scales): the clip
# ratio searched per group for the least squared error (``clip="mse"``), or the INT
# full-range rule ``s = v* / -2^(b-1)`` (all 2^b levels used; INT formats only).
def _mse_clip(fmt: QuantFormat) -> QuantFormat:
    return replace(fmt, clip="mse")


def _full_range(fmt: QuantFormat) -> QuantFormat:
    return replace(fmt, scale_rule="full_range")


def _span(fmt: QuantFormat) -> QuantFormat:
    return replace(fmt, scale_rule="span")


FORMAT_CHANGES: dict[str, Callable[[QuantFormat], QuantFormat]] = {
    "RTN + MSE clip": _mse_clip,
    "GPTQ act-order + MSE clip": _mse_clip,
    "AdaRound + MSE clip": _mse_clip,
    "RTN full-range": _full_range,
    "GPTQ act-order full-range": _full_range,
    "RTN span": _span,
    "GPTQ act-order span": _span,
    "AWQ span": _span,
    "AWQ full-range": _full_range,
    "AWQ+GPTQ full-range": _full_range,
}
PEERS = {
    "llm-compressor GPTQ": "gptq",
    "llm-compressor RTN": "rtn",
    "llm-compressor AWQ": "awq",
}


def load_peer_output(path: Path, peer: str) -> nn.Module:
    """llm-compressor's output as an fp32 model: decompressed by the peer venv's own
    transformers and compressed-tensors (``peers/llmc_dequantize.py``), then loaded."""
    from transformers import AutoModelForCausalLM

    plain = path.with_name(path.name + "-fp32")
    script = Path(__file__).resolve().parent / "peers" / "llmc_dequantize.py"
    try:
        done = subprocess.run(
            [peer, str(script), str(path), str(plain)], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"llmc_dequantize.py failed: {done.stderr[-2000:]}")
        model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    finally:
        shutil.rmtree(plain, ignore_errors=True)
    return model.eval()


def add_row(rows: list[dict[str, object]], row: dict[str, object]) -> None:
    """Append ``row``, replacing an earlier row of the same format and method."""
    rows[:] = [r for r in rows if (r["format"], r["method"]) != (row["format"], row["method"])]
    rows.append(row)


def write(rows: list[dict[str, object]], fp_ppl: float, out: Path, header: str) -> None:
    """The markdown table (rows sorted by format, then method) and its JSON rows."""
    order = {f: i for i, f in enumerate(FORMATS)}
    methods = [*OURS, *PEERS]
    rows.sort(key=lambda r: (order.get(str(r["format"]), 99), methods.index(str(r["method"]))))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# Rounding methods on SmolLM2-135M (weight-only)",
        "",
        header,
        "",
        f"FP perplexity: **{fp_ppl:.3f}**",
        "",
        "| format | method | ppl | vs FP | vs llm-compressor GPTQ | quant. seconds | threads | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = {r["format"]: r["ppl"] for r in rows if r["method"] == "llm-compressor GPTQ"}
    for r in rows:
        ppl = float(r["ppl"])  # type: ignore[arg-type]
        peer = ref.get(r["format"])
        vs = f"{ppl / float(peer):.3f}" if peer is not None else "-"  # type: ignore[arg-type]
        lines.append(
            f"| {r['format']} | {r['method']} | {ppl:.3f} | {ppl / fp_ppl:.3f} | {vs} | "
            f"{float(r['seconds']):.1f} | {r.get('threads', 2)} | {r.get('note', '')} |"  # type: ignore[arg-type]
        )
    gptq = {(r["format"], r["method"]): float(r["seconds"]) for r in rows}  # type: ignore[arg-type]
    lines += ["", "GPTQ wall time (quantization step only), ours / llm-compressor:", ""]
    for f in FORMATS:
        a, b = gptq.get((f, "GPTQ act-order")), gptq.get((f, "llm-compressor GPTQ"))
        if a is not None and b is not None:
            lines.append(f"- {f}: {a:.1f} s / {b:.1f} s = **{a / b:.2f}x**")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 8 :]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument(
        "--only",
        default="",
        help="Comma-separated substrings of 'FORMAT METHOD' labels (a trailing $: the whole "
        "label); run only matching rows.",
    )
    ap.add_argument("--peer", default="/work/peers/llmc/bin/python")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "rounding_smollm2.md")
    ap.add_argument(
        "--append",
        action="store_true",
        help="Keep the rows of earlier runs (OUT with .json); rows run again replace theirs.",
    )
    ap.add_argument(
        "--merge",
        type=Path,
        action="append",
        default=[],
        help="Rows (.json) of another run of this script with the same settings (e.g. the "
        "llm-compressor rows run in a parallel process) to include in OUT.",
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    source = resolve_model("default", quiet=True)
    fp_model, tok = load_fp_model(source)
    fp_model = fp_model.float().eval()
    eval_ids = tokenize_eval_text(tok, default_eval_file(), a.eval_tokens)
    cal = calibration_batches(tok, path=None, n_samples=a.samples, seqlen=a.seqlen, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="rounding_smollm2_"))
    torch.save(cal, tmp / "calib.pt")
    torch.save(eval_ids, tmp / "eval.pt")
    fp_ppl = perplexity(fp_model, eval_ids, seqlen=512, progress=False)
    header = (
        f"Calibration {a.samples} x {a.seqlen} tokens (default text, seed 0, identical ids "
        f"for llm-compressor); eval {eval_ids.numel()} tokens of `{default_eval_file().name}` "
        "in 512-token windows; CPU threads per row in the table; lm_head (tied) not quantized."
    )
    rows: list[dict[str, object]] = []
    store = a.out.with_suffix(".json")
    if a.append and store.exists():
        rows = json.loads(store.read_text())
    for extra in a.merge:
        for row in json.loads(extra.read_text()):
            add_row(rows, row)
    for fname, fmt in FORMATS.items():
        scheme = Scheme(name=fname, weight=fmt, activation=None, group_size_is_ceiling=False)
        for method, peer_method in PEERS.items():
            if not selected(a.only, f"{fname} {method}"):
                continue
            out_dir = tmp / f"{fname}_{peer_method}"
            cmd = [
                a.peer,
                str(ROOT / "peers" / "llmc_quantize.py"),
                "--model",
                str(source.path),
                "--calib",
                str(tmp / "calib.pt"),
                "--scheme",
                fname,
                "--method",
                peer_method,
                "--out",
                str(out_dir),
                "--eval-ids",
                str(tmp / "eval.pt"),
                "--threads",
                str(a.threads),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("LLMC_RESULT ")]
            if proc.returncode != 0 or not found:
                print(proc.stderr[-3000:], flush=True)
                add_row(
                    rows,
                    {
                        "format": fname,
                        "method": method,
                        "ppl": float("nan"),
                        "seconds": 0.0,
                        "note": f"failed (rc {proc.returncode})",
                        "threads": a.threads,
                    },
                )
                write(rows, fp_ppl, a.out, header)
                continue
            res = json.loads(found[-1].split(" ", 1)[1])
            try:
                ppl = perplexity(
                    load_peer_output(out_dir, a.peer), eval_ids, seqlen=512, progress=False
                )
                note = f"reloaded here; in-peer ppl {res['ppl_in_peer']:.3f}"
            except Exception as exc:
                ppl = float(res["ppl_in_peer"])
                note = f"evaluated in the peer venv (reload failed: {type(exc).__name__})"
            add_row(
                rows,
                {
                    "format": fname,
                    "method": method,
                    "ppl": ppl,
                    "seconds": res["seconds"],
                    "note": note,
                    "threads": a.threads,
                },
            )
            write(rows, fp_ppl, a.out, header)
        for method, make in OURS.items():
            if not selected(a.only, f"{fname} {method}"):
                continue
            model = copy.deepcopy(fp_model)
            try:
                fmt_m = FORMAT_CHANGES.get(method, lambda f: f)(fmt)
            except ValueError as exc:  # e.g. full-range on a float format
                print(f"{fname} {method}: skipped ({exc})", flush=True)
                continue
            plan = build_plan(model, replace(scheme, weight=fmt_m))
            ctx = PassContext(calibration=cal, progress=False)
            start = time.perf_counter()
            made = make()
            passes = made if isinstance(made, list) else [made]
            Pipeline(passes).run(QuantState(model=model, plan=plan, tokenizer=tok), ctx)
            secs = time.perf_counter() - start
            ppl = perplexity(model, eval_ids, seqlen=512, progress=False)
            add_row(
                rows,
                {
                    "format": fname,
                    "method": method,
                    "ppl": ppl,
                    "seconds": secs,
                    "threads": a.threads,
                },
            )
            write(rows, fp_ppl, a.out, header)
    if rows:
        write(rows, fp_ppl, a.out, header)


if __name__ == "__main__":
    main()
