"""W8A8 / FP8 / W4A8 accuracy on SmolLM2-135M: RTN vs SmoothQuant, rotation, LoRC.

One run, same data for every row: calibration 32 x 256 tokens of the default text,
perplexity on 4096 held-out tokens (``ptq.models.paths.default_eval_file()``) in
512-token windows. The FP model is loaded and evaluated once; each row runs the same
steps as ``ptq.api.quantize`` (``build_plan`` then a ``Pipeline`` of passes) on a copy,
so the FP evaluation is not repeated per row. The table (ppl, ratio to FP, ratio to the
same scheme's RTN row) is printed and written to ``benchmarks/results/w4a8_smollm2.md``
after every row; the last row per W4A8 scheme combines what beat RTN with LoRC r32.

Usage::

    .venv/bin/python benchmarks/w4a8_smollm2.py [--only SUBSTRING] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from row_filter import selected

from ptq.calibration.text import calibration_batches
from ptq.compose import build_passes
from ptq.evaluate import perplexity, tokenize_eval_text
from ptq.formats import FP4_E2M1, INT4, PerGroup, QuantFormat
from ptq.models.paths import default_eval_file
from ptq.models.source import load_fp_model, resolve_model
from ptq.pipeline import Pass, PassContext, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.scheme import ACTIVATION_FORMATS, Scheme, get_scheme

FP8_TOKEN = ACTIVATION_FORMATS["fp8"]
S_STATIC = "W8A8-INT static per-tensor"
SCHEMES: dict[str, Scheme] = {
    "W8A8-INT": get_scheme("w8a8"),
    S_STATIC: Scheme(
        name="w8a8_int8_tensor_static",
        weight=get_scheme("w8a8").weight,
        activation=ACTIVATION_FORMATS["int8_tensor_static"],
    ),
    "FP8": get_scheme("fp8"),
    "W4A8 INT4-g64 x FP8": Scheme(
        name="w4a8_int4_g64", weight=QuantFormat(INT4, PerGroup(64)), activation=FP8_TOKEN
    ),
    "W4A8 FP4-M2-g64 x FP8": Scheme(
        name="w4a8_fp4_m2_g64",
        weight=QuantFormat(FP4_E2M1, PerGroup(64), scale_format="pow2", channel_scale=True),
        activation=FP8_TOKEN,
    ),
}


class Row(NamedTuple):
    """One table row: scheme key, label and the options of its pipeline."""

    scheme: str
    label: str
    sq: str | None = None  # SmoothQuant: "search" or an alpha
    rot: str | None = None  # rotation: "offline" or "online" (online H before down_proj)
    lorc: int = 0  # LoRC rank (0: off)
    gptq: bool = False
    full_range: bool = False  # INT weights: s = v* / -2^(b-1) instead of amax / q_max


def row_scheme(row: Row) -> Scheme:
    """The row's scheme (full-range weight scales if asked)."""
    scheme = SCHEMES[row.scheme]
    if row.full_range:
        return replace(scheme, weight=replace(scheme.weight, scale_rule="full_range"))
    return scheme


def build(row: Row) -> list[Pass]:
    """The ``ptq quantize`` pipeline (:func:`ptq.compose.build_passes`) for one row.

    Weight pass: GPTQ (act-order, static groups) or RTN (ZeroQuant-FP M2 scales for FP4);
    static activation schemes get their activation-calibration pass.
    """
    method = "gptq" if row.gptq else ("zeroquant_fp" if "FP4" in row.scheme else "rtn")
    return build_passes(
        row_scheme(row),
        method=method,
        smoothquant=row.sq,
        rotate=row.rot is not None,
        rotate_online=row.rot == "online",
        lorc=row.lorc or None,
    )


S_INT4, S_FP4 = "W4A8 INT4-g64 x FP8", "W4A8 FP4-M2-g64 x FP8"
# Ordered so that a partial run already answers the main questions.
ROWS: list[Row] = [
    Row("W8A8-INT", "RTN"),
    Row("W8A8-INT", "+SmoothQuant (search)", sq="search"),
    Row("W8A8-INT", "GPTQ +SmoothQuant (search)", sq="search", gptq=True),
    Row("FP8", "RTN"),
    # Static per-tensor INT8 activations: where outliers matter, so where SmoothQuant and
    # rotation should earn their keep.
    Row(S_STATIC, "RTN"),
    Row(S_STATIC, "+SmoothQuant (search)", sq="search"),
    Row(S_STATIC, "+rotation (online H down)", rot="online"),
    Row(S_STATIC, "+rotation (online H down) +SmoothQuant (search)", sq="search", rot="online"),
    Row(S_INT4, "RTN"),
    Row(S_INT4, "GPTQ", gptq=True),
    Row(S_INT4, "RTN full-range", full_range=True),
    Row(S_INT4, "GPTQ full-range", gptq=True, full_range=True),
    Row(S_FP4, "RTN"),
    Row(S_FP4, "GPTQ", gptq=True),
    Row(S_INT4, "+SmoothQuant (search)", sq="search"),
    Row(S_FP4, "+SmoothQuant (search)", sq="search"),
    Row(S_INT4, "+rotation (online H down)", rot="online"),
    Row(S_FP4, "+rotation (online H down)", rot="online"),
    Row(S_INT4, "+LoRC r8", lorc=8),
    Row(S_INT4, "+LoRC r32", lorc=32),
    Row(S_FP4, "+LoRC r8", lorc=8),
    Row(S_FP4, "+LoRC r32", lorc=32),
]
# llm-compressor rows (benchmarks/peers/llmc_quantize.py schemes), same calibration ids.
PEER_ROWS = {
    "W8A8-INT": ("llm-compressor SmoothQuant 0.8 + GPTQ", "w8a8_sq_gptq"),
    S_INT4: ("llm-compressor GPTQ (W4A8 INT4-g64 x FP8 token)", "w4a8_fp8_int4_g64"),
}


def best_combination(scheme: str, done: dict[tuple[str, str], float]) -> Row:
    """GPTQ with every component that beat RTN on its own, and LoRC r32."""
    rtn = done[(scheme, "RTN")]
    sq = "search" if done.get((scheme, "+SmoothQuant (search)"), rtn) < rtn else None
    rot = "online" if done.get((scheme, "+rotation (online H down)"), rtn) < rtn else None
    fr = done.get((scheme, "RTN full-range"), rtn) < rtn
    named = (("rotation", rot), ("SQ", sq), ("full-range", fr))
    parts = ["GPTQ"] + [n for n, on in named if on] + ["LoRC r32"]
    label = "best: " + " + ".join(parts)
    return Row(scheme, label, sq=sq, rot=rot, lorc=32, gptq=True, full_range=fr)


Result = tuple[str, str, float, float]  # scheme, label, ppl, seconds


def _row_order(r: Result) -> tuple[int, int]:
    """Schemes in ``SCHEMES`` order; within one, ``ROWS`` order, then best, then peers."""
    schemes = list(SCHEMES)
    labels = [row.label for row in ROWS if row.scheme == r[0]]
    rank = labels.index(r[1]) if r[1] in labels else (100 if r[1].startswith("best") else 200)
    return (schemes.index(r[0]) if r[0] in schemes else len(schemes), rank)


def table(fp: float, results: list[Result]) -> str:
    rtn = {s: p for s, v, p, _ in results if v == "RTN"}
    lines = [
        "| scheme | method | ppl | ppl / FP | ppl / RTN (same scheme) | loss kept vs RTN | seconds |",
        "|---|---|---|---|---|---|---|",
        f"| FP32 | - | {fp:.3f} | 1.000 | - | - | - |",
    ]
    for s, v, p, sec in sorted(results, key=_row_order):
        r_rtn = f"{p / rtn[s]:.3f}" if s in rtn else "-"
        kept = f"{(p - fp) / (rtn[s] - fp):.2f}" if s in rtn and rtn[s] > fp else "-"
        lines.append(f"| {s} | {v} | {p:.3f} | {p / fp:.3f} | {r_rtn} | {kept} | {sec:.0f} |")
    return "\n".join(lines)


def run_peer(python: str, model: Path, scheme: str, calib: Path, eval_ids: Path) -> float:
    """llm-compressor's perplexity (activation quantization on) from the peer venv."""
    out = Path(tempfile.mkdtemp(prefix="w4a8_peer_"))
    cmd = [
        python,
        str(Path(__file__).parent / "peers" / "llmc_quantize.py"),
        *("--model", str(model), "--calib", str(calib), "--scheme", scheme),
        *("--method", "gptq", "--out", str(out / "model"), "--eval-ids", str(eval_ids)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("LLMC_RESULT ")]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"llm-compressor failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return float(json.loads(found[-1].split(" ", 1)[1])["ppl_in_peer"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated substrings of 'scheme method'")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/w4a8_smollm2.md"))
    ap.add_argument("--append", action="store_true", help="keep earlier rows (OUT .json)")
    ap.add_argument("--peer", default="/work/peers/llmc/bin/python", help="llm-compressor venv")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = resolve_model("default", quiet=True)
    fp_model, tokenizer = load_fp_model(source)
    eval_ids = tokenize_eval_text(tokenizer, default_eval_file(), 4096)
    calib = calibration_batches(tokenizer, path=None, n_samples=32, seqlen=256, seed=0)
    fp = perplexity(fp_model, eval_ids, seqlen=512, progress=False)
    print(f"FP perplexity {fp:.3f} ({eval_ids.numel()} tokens)", flush=True)
    header = (
        "# SmolLM2-135M: W8A8 / FP8 / W4A8 perplexity (one run, same data)\n\n"
        "Calibration: 32 x 256 tokens (default text, seed 0). Eval: 4096 held-out tokens "
        "(`default_eval_file()`), seqlen 512. Activations: dynamic per-token (INT8 for "
        "W8A8, FP8 E4M3 otherwise), except the static per-tensor INT8 rows (min-max "
        "scales calibrated on the same 32 x 256 tokens). FP4 rows: ZeroQuant-FP M2 (per-row real scale x "
        "per-group power-of-two, exact FP4->FP8 cast). SmoothQuant: alpha searched per "
        "group on 0.3..0.9 (or off). Rotation: QuaRot randomised Hadamard + online "
        "Hadamard before down_proj. LoRC: fp16 factors. GPTQ: act-order, static groups. "
        "full-range: INT weight scales s = v* / -8 (all 16 levels) instead of amax / 7. "
        "'loss kept vs RTN' = (ppl - FP) / (RTN ppl - FP) of the same scheme (target <= 0.5). "
        "llm-compressor rows: perplexity computed in its venv on its in-memory model after "
        "`oneshot` (activation fake-quantization on), same ids and windows.\n"
        "Command: `.venv/bin/python benchmarks/w4a8_smollm2.py`\n\n"
    )
    store = args.out.with_suffix(".json")
    results: list[Result] = []
    if args.append and store.exists():
        results = [tuple(r) for r in json.loads(store.read_text())]
    done: dict[tuple[str, str], float] = {(s, v): p for s, v, p, _ in results}
    tmp = Path(tempfile.mkdtemp(prefix="w4a8_bench_"))
    torch.save(calib, tmp / "calib.pt")
    torch.save(eval_ids, tmp / "eval.pt")

    def record(scheme: str, label: str, ppl: float, seconds: float) -> None:
        results[:] = [r for r in results if (r[0], r[1]) != (scheme, label)]
        results.append((scheme, label, ppl, seconds))
        done[(scheme, label)] = ppl
        print(f"{scheme:24s} {label:46s} ppl {ppl:9.3f}  (FP {fp:.3f})", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(results, indent=1) + "\n")
        args.out.write_text(header + table(fp, results) + "\n")

    rows = list(ROWS)
    finished: set[str] = set()
    i = 0
    while i < len(rows):
        row = rows[i]
        scheme, variant = row.scheme, row.label
        i += 1
        if selected(args.only, f"{scheme} {variant}"):
            start = time.perf_counter()
            model = copy.deepcopy(fp_model)
            plan = build_plan(model, row_scheme(row))
            ctx = PassContext(seed=0, progress=False, calibration=calib)
            passes = build(row)
            Pipeline(passes).run(QuantState(model, plan, tokenizer), ctx)
            ppl = perplexity(model, eval_ids, seqlen=512, progress=False)
            del model
            record(scheme, variant, ppl, time.perf_counter() - start)
        if scheme in finished or any(r[0] == scheme for r in rows[i:]):
            continue
        finished.add(scheme)  # the scheme's last row: its best combination, then the peer
        wants_best = selected(args.only, f"{scheme} best")
        if scheme in (S_INT4, S_FP4) and wants_best and (scheme, "RTN") in done:
            rows.append(best_combination(scheme, done))
        if scheme in PEER_ROWS:
            label, peer_scheme = PEER_ROWS[scheme]
            if selected(args.only, f"{scheme} {label}"):
                start = time.perf_counter()
                try:
                    ppl = run_peer(
                        args.peer, source.path, peer_scheme, tmp / "calib.pt", tmp / "eval.pt"
                    )
                    record(scheme, label, ppl, time.perf_counter() - start)
                except RuntimeError as exc:
                    print(f"{scheme} {label}: {exc}", flush=True)
    print(table(fp, results))


if __name__ == "__main__":
    main()
