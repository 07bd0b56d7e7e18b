"""ONNX Runtime on CPU, SmolLM2-135M: ptq exports vs FP32 and vs ORT's own 4-bit quantizer.

One run builds every variant, measures its perplexity through ORT on held-out Britannica
text (``--eval-tokens``, non-overlapping 512-token windows, ``ppl = exp(mean NLL)``), then
times all variants in ``--rounds`` interleaved rounds (so a change of machine load hits
every variant alike): batch-1 decode latency per token (KV cache, ``--decode-tokens``
new tokens after a 64-token prompt, median per round) and prefill throughput (256-token
prompt, median of 3). Reported speed = median over rounds; ratios vs FP32 and vs ORT's
4-bit RTN g64. Every 4-bit variant uses ``accuracy_level=4``; sessions use ``--threads``
intra-op threads (default 1).

Variants: ptq INT4 g64 RTN (amax and ``full_range`` scale rules), GPTQ (act-order with
static groups, ptq's default; amax and full-range; ``--gptq-samples`` x ``--gptq-seqlen``
calibration tokens), the g64/128 preset, MSE clipping, W8A8 as ``MatMulInteger`` and as
QDQ; ORT's ``MatMulNBitsQuantizer`` RTN g64/g128 (symmetric: its full-range rule) and
GPTQ g64 (``--ort-gptq-samples`` x 128 tokens of the same calibration text, run in a
subprocess bounded by ``--ort-gptq-timeout`` seconds).

    nice -n 5 .venv/bin/python benchmarks/onnx_smollm2.py [--out benchmarks/results/onnx_smollm2.md]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ptq.api import CalibrationConfig, quantize
from ptq.evaluate import tokenize_eval_text
from ptq.exporters.onnx import export_onnx
from ptq.exporters.onnx.runtime import empty_past, forward, make_session
from ptq.formats import INT4, PerGroup, QuantFormat
from ptq.models.paths import default_calibration_files, default_eval_file
from ptq.models.source import load_fp_model, resolve_model
from ptq.passes.gptq import GPTQPass
from ptq.scheme import Scheme, get_scheme

ORT_GPTQ_SEQLEN = 128


def decode_ms(session: Any, prompt: np.ndarray, n: int) -> float:
    logits, past = forward(session, prompt)
    times = []
    for _ in range(n):
        tok = np.asarray([[int(np.argmax(logits[0, -1]))]])
        t = time.perf_counter()
        logits, past = forward(session, tok, past)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def prefill_tps(session: Any, ids: np.ndarray, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        forward(session, ids)
        times.append(time.perf_counter() - t)
    return ids.shape[1] / statistics.median(times)


def ort_ppl(session: Any, ids: np.ndarray, seqlen: int = 512) -> float:
    nll, count = 0.0, 0
    for w in range(ids.size // seqlen):
        win = ids[w * seqlen : (w + 1) * seqlen]
        logits, _ = forward(session, win[None])
        logp = torch.log_softmax(torch.from_numpy(logits[0, :-1]).double(), -1)
        nll -= float(logp.gather(1, torch.from_numpy(win[1:, None])).sum())
        count += seqlen - 1
    return math.exp(nll / count)


def ort_quantize(fp_path: Path, out: Path, block: int, algo: str, calib: np.ndarray) -> Path:
    """ORT's MatMulNBitsQuantizer, symmetric, accuracy level 4 (``algo`` rtn or gptq)."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    logging.disable(logging.INFO)  # ORT logs one line per node
    cfg: Any
    if algo == "rtn":
        cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4)
    else:
        session = make_session(fp_path)
        feeds = [dict(empty_past(session), input_ids=c[None]) for c in calib]

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(feeds)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.it, None)

        cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader())
    q = MatMulNBitsQuantizer(
        onnx.load(str(fp_path)),
        block_size=block,
        is_symmetric=True,
        accuracy_level=4,
        algo_config=cfg,
    )
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)
    return out


def ort_gptq_subprocess(fp_path: Path, out: Path, calib: np.ndarray, timeout: int) -> Path:
    """ORT GPTQ in a child process (its progress bar and runtime are unbounded otherwise)."""
    ids = out.with_suffix(".calib.npy")
    np.save(ids, calib)
    cmd = [sys.executable, __file__, "--ort-gptq-worker", str(fp_path), str(out), str(ids)]
    res = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, check=False)
    if res.returncode != 0 or not out.is_file():
        raise RuntimeError(f"ORT GPTQ failed ({res.returncode}): {res.stderr[-2000:]}")
    return out


def nbits_weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {
        t.name: onnx.numpy_helper.to_array(t)
        for t in model.graph.initializer
        if "MatMul" in t.name or t.name.endswith(("_Q4", "_scales"))
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ptq_onnx_bench"))
    ap.add_argument("--out", type=Path, default=None, help="Write the markdown table here.")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gptq-samples", type=int, default=32)
    ap.add_argument("--gptq-seqlen", type=int, default=256)
    ap.add_argument("--ort-gptq-samples", type=int, default=8)
    ap.add_argument("--ort-gptq-timeout", type=int, default=3600)
    ap.add_argument("--skip-gptq", action="store_true", help="No GPTQ rows (ptq or ORT).")
    ap.add_argument("--skip-qdq", action="store_true", help="No W8A8 QDQ row (slow).")
    ap.add_argument("--ort-gptq-worker", nargs=3, default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def build_variants(
    args: argparse.Namespace, wd: Path, calib: np.ndarray
) -> dict[str, Callable[[], Path]]:
    source = resolve_model("default", quiet=True)
    fp, _ = load_fp_model(source)
    fp_path = export_onnx(fp, wd / "fp32.onnx")
    del fp
    gptq_cal = CalibrationConfig(samples=args.gptq_samples, seqlen=args.gptq_seqlen)

    def ptq(scheme: Scheme | str, name: str, gptq: bool = False, **export: Any) -> Path:
        model = quantize(
            source,
            scheme,
            pipeline=[GPTQPass()] if gptq else None,
            calibration=gptq_cal,
            progress=False,
            log=lambda *_: None,
        ).model
        return export_onnx(model, wd / f"{name}.onnx", accuracy_level=4, **export)

    def g64(**kw: Any) -> Scheme:
        return Scheme(name="int4-g64", weight=QuantFormat(INT4, PerGroup(64), **kw))

    full = {"scale_rule": "full_range"}
    v: dict[str, Callable[[], Path]] = {
        "FP32": lambda: fp_path,
        "ptq INT4 g64 RTN": lambda: ptq(g64(), "ptq_g64"),
        "ptq INT4 g64 RTN full-range": lambda: ptq(g64(**full), "ptq_g64_fr"),
    }
    if not args.skip_gptq:
        v["ptq INT4 g64 GPTQ"] = lambda: ptq(g64(), "ptq_g64_gptq", gptq=True)
        v["ptq INT4 g64 GPTQ full-range"] = lambda: ptq(g64(**full), "ptq_g64_gptq_fr", gptq=True)
    v["ptq INT4 g64/128 RTN (preset)"] = lambda: ptq(get_scheme("w4a16"), "ptq_g128")
    v["ptq INT4 g64 MSE-clip"] = lambda: ptq(g64(clip="mse"), "ptq_g64_mse")
    v["ptq W8A8 INT8 MatMulInteger"] = lambda: ptq("w8a8", "ptq_w8a8")
    if not args.skip_qdq:
        v["ptq W8A8 INT8 QDQ"] = lambda: ptq("w8a8", "ptq_w8a8_qdq", int8_matmul="qdq")
    v["ORT INT4 g64 RTN"] = lambda: ort_quantize(fp_path, wd / "ort_g64.onnx", 64, "rtn", calib)
    v["ORT INT4 g128 RTN"] = lambda: ort_quantize(fp_path, wd / "ort_g128.onnx", 128, "rtn", calib)
    if not args.skip_gptq:
        v["ORT INT4 g64 GPTQ"] = lambda: ort_gptq_subprocess(
            fp_path, wd / "ort_gptq.onnx", calib, args.ort_gptq_timeout
        )
    return v


def table(
    rows: dict[str, tuple[float, float, float, float]], seconds: dict[str, float]
) -> list[str]:
    """Markdown rows: (decode ms, prefill tok/s, ppl, MiB) with ratios."""
    base, ort4 = rows.get("FP32"), rows.get("ORT INT4 g64 RTN")

    def ratio(ref: tuple[float, ...] | None, i: int, v: float) -> str:
        return "-" if ref is None else f"{(ref[i] / v if i == 0 else v / ref[i]):.2f}"

    out = [
        "| variant | decode ms/tok | x FP32 | x ORT4 | prefill tok/s | x FP32 | x ORT4 "
        "| ppl | ppl / FP32 | MiB | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (dms, tps, ppl, mib) in rows.items():
        fp_ppl = "-" if base is None else f"{ppl / base[2]:.3f}"
        out.append(
            f"| {name} | {dms:.1f} | {ratio(base, 0, dms)} | {ratio(ort4, 0, dms)} | "
            f"{tps:.0f} | {ratio(base, 1, tps)} | {ratio(ort4, 1, tps)} | {ppl:.3f} | "
            f"{fp_ppl} | {mib:.0f} | {seconds[name]:.0f} |"
        )
    return out


def main() -> None:
    args = parse_args()
    if args.ort_gptq_worker is not None:
        fp_path, out, ids = args.ort_gptq_worker
        ort_quantize(Path(fp_path), Path(out), 64, "gptq", np.load(ids))
        return
    wd: Path = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started, load_start = time.strftime("%Y-%m-%d %H:%M %Z"), load()
    _, tok = load_fp_model(resolve_model("default", quiet=True))
    eval_ids = tokenize_eval_text(tok, default_eval_file(), args.eval_tokens).numpy()
    calib_text = tok(default_calibration_files()[0].read_text()[:60000])["input_ids"]
    n = args.ort_gptq_samples * ORT_GPTQ_SEQLEN
    calib = np.asarray(calib_text[:n]).reshape(args.ort_gptq_samples, ORT_GPTQ_SEQLEN)
    paths: dict[str, Path] = {}
    quality: dict[str, tuple[float, float]] = {}
    seconds: dict[str, float] = {}
    for name, make in build_variants(args, wd, calib).items():
        t = time.perf_counter()
        try:
            paths[name] = make()
        except Exception as exc:  # report and keep going: one table in one run
            print(f"{name}: failed after {time.perf_counter() - t:.0f}s: {exc!r}", flush=True)
            continue
        seconds[name] = time.perf_counter() - t
        ppl = ort_ppl(make_session(paths[name], threads=args.threads), eval_ids)
        quality[name] = (ppl, paths[name].stat().st_size / 2**20)
        print(f"{name}: built in {seconds[name]:.0f}s, ppl {ppl:.3f} (load {load()})", flush=True)
    prompt, prefill = eval_ids[:64][None], eval_ids[:256][None]
    speed: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for r in range(args.rounds):
        for name, path in paths.items():
            s = make_session(path, threads=args.threads)
            speed[name].append((decode_ms(s, prompt, args.decode_tokens), prefill_tps(s, prefill)))
            print(f"round {r} {name}: {speed[name][-1]} (load {load()})", flush=True)
    rows = {
        name: (
            statistics.median(d for d, _ in speed[name]),
            statistics.median(p for _, p in speed[name]),
            *quality[name],
        )
        for name in paths
    }
    notes = []
    if "ORT INT4 g64 GPTQ" in paths:
        rtn, gptq = nbits_weights(wd / "ort_g64.onnx"), nbits_weights(wd / "ort_gptq.onnx")
        same = sum(np.array_equal(rtn[k], gptq[k]) for k in rtn if k in gptq)
        notes.append(f"ORT GPTQ vs ORT RTN: {same}/{len(rtn)} quantized initializers identical")
    lines = [
        f"Run: {started} -> {time.strftime('%H:%M %Z')}; machine: {machine()}; "
        f"load average (1/5/15 min) at start {load_start}, at end {load()}; "
        f"{args.threads} ORT thread(s); onnxruntime {__import__('onnxruntime').__version__}.",
        "",
        *table(rows, seconds),
        "",
        *notes,
    ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
