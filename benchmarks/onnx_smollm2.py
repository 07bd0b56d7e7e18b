"""ONNX Runtime on CPU, SmolLM2-135M: ptq exports vs FP32 and vs ORT's own 4-bit quantizer.

One run measures, for each variant, batch-1 decode latency per token (KV cache, 64 new
tokens after a 64-token prompt, median), prefill throughput (256-token prompt, median of
3) and perplexity through ORT on held-out Britannica text (4096 tokens, non-overlapping
512-token windows, ``ppl = exp(mean NLL)``), then prints one table with ratios vs FP32
and vs ORT's 4-bit RTN g64. Every 4-bit variant uses ``accuracy_level=4``.

    .venv/bin/python benchmarks/onnx_smollm2.py [--workdir /tmp/ptq_onnx_bench] [--skip-gptq]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ptq.api import quantize
from ptq.evaluate import tokenize_eval_text
from ptq.exporters.onnx import export_onnx
from ptq.exporters.onnx.runtime import empty_past, forward, make_session
from ptq.formats import INT4, PerGroup, QuantFormat
from ptq.models.paths import default_calibration_files, default_eval_file
from ptq.models.source import load_fp_model, resolve_model
from ptq.scheme import Scheme, get_scheme


def decode_ms(session: Any, prompt: np.ndarray, n: int = 64) -> float:
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
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        GPTQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

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

        cfg = GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=block)
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


def nbits_weights(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {
        t.name: onnx.numpy_helper.to_array(t)
        for t in model.graph.initializer
        if "MatMul" in t.name or t.name.endswith(("_Q4", "_scales"))
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ptq_onnx_bench"))
    ap.add_argument("--skip-gptq", action="store_true")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    wd: Path = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    source = resolve_model("default", quiet=True)
    fp, tok = load_fp_model(source)
    eval_ids = tokenize_eval_text(tok, default_eval_file(), args.eval_tokens).numpy()
    calib_text = tok(default_calibration_files()[0].read_text()[:20000])["input_ids"]
    calib = np.asarray(calib_text[: 8 * 128]).reshape(8, 128)  # GPTQ calibration: a play
    silent: Callable[..., None] = lambda *_: None  # noqa: E731

    def ptq_variant(scheme: Scheme | str, name: str) -> Path:
        model = quantize(source, scheme, progress=False, log=silent).model
        return export_onnx(model, wd / f"{name}.onnx", accuracy_level=4)

    g64 = Scheme(name="int4-g64", weight=QuantFormat(INT4, PerGroup(64)))
    g64_mse = Scheme(name="int4-g64-mse", weight=QuantFormat(INT4, PerGroup(64), clip="mse"))
    fp_path = export_onnx(fp, wd / "fp32.onnx")
    variants: dict[str, Callable[[], Path]] = {
        "FP32": lambda: fp_path,
        "ptq INT4 g64 RTN": lambda: ptq_variant(g64, "ptq_g64"),
        "ptq INT4 g64/128 RTN (preset)": lambda: ptq_variant(get_scheme("w4a16"), "ptq_g128"),
        "ptq INT4 g64 MSE-clip": lambda: ptq_variant(g64_mse, "ptq_g64_mse"),
        "ptq W8A8 INT8 QDQ": lambda: ptq_variant("w8a8", "ptq_w8a8"),
        "ORT INT4 g64 RTN": lambda: ort_quantize(fp_path, wd / "ort_g64.onnx", 64, "rtn", calib),
        "ORT INT4 g128 RTN": lambda: ort_quantize(fp_path, wd / "ort_g128.onnx", 128, "rtn", calib),
    }
    if not args.skip_gptq:
        variants["ORT INT4 g64 GPTQ"] = lambda: ort_quantize(
            fp_path, wd / "ort_gptq.onnx", 64, "gptq", calib
        )
    prompt = eval_ids[:64][None]
    prefill = eval_ids[:256][None]
    rows: dict[str, tuple[float, float, float, float]] = {}
    for name, make in variants.items():
        t = time.perf_counter()
        try:
            path = make()
        except Exception as exc:  # report and keep going: one table in one run
            print(f"{name}: failed: {type(exc).__name__}: {exc}")
            continue
        s = make_session(path)
        rows[name] = (
            decode_ms(s, prompt),
            prefill_tps(s, prefill),
            ort_ppl(s, eval_ids),
            path.stat().st_size / 2**20,
        )
        print(f"{name}: done in {time.perf_counter() - t:.0f}s {rows[name]}", flush=True)
    if "ORT INT4 g64 GPTQ" in rows:
        rtn, gptq = nbits_weights(wd / "ort_g64.onnx"), nbits_weights(wd / "ort_gptq.onnx")
        same = sum(np.array_equal(rtn[k], gptq[k]) for k in rtn if k in gptq)
        print(f"ORT GPTQ vs RTN: {same}/{len(rtn)} quantized initializers identical")
    base, ort4 = rows.get("FP32"), rows.get("ORT INT4 g64 RTN")
    print(
        f"\n{'variant':32s} {'decode ms/tok':>13s} {'x FP32':>7s} {'x ORT4':>7s} "
        f"{'prefill tok/s':>13s} {'x FP32':>7s} {'x ORT4':>7s} {'ppl':>8s} {'MiB':>6s}"
    )
    for name, (dms, tps, ppl, mib) in rows.items():

        def ratio(ref: tuple[float, float, float, float] | None, i: int, v: float) -> str:
            return "-" if ref is None else f"{(ref[i] / v if i == 0 else v / ref[i]):.2f}"

        print(
            f"{name:32s} {dms:13.2f} {ratio(base, 0, dms):>7s} {ratio(ort4, 0, dms):>7s} "
            f"{tps:13.1f} {ratio(base, 1, tps):>7s} {ratio(ort4, 1, tps):>7s} {ppl:8.3f} "
            f"{mib:6.0f}"
        )
    print("(speed ratios > 1 mean faster than the reference; ppl lower is better)")


if __name__ == "__main__":
    main()
