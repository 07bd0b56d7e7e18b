"""GPU check and speed of the ptq quantized-linear kernels (ptq.exporters.cuda).

Run: ``python benchmarks/gpu_kernels.py`` (about 3-5 minutes on one H100/H200; prints
"no CUDA device" and exits 0 without a GPU). It

1. builds the extension (timed);
2. checks every kernel path (GEMV M<=8, GEMM M>8 with and without split-K; formats INT4
   sym/asym, NVFP4, MXFP4, INT8, FP8; fp16/bf16 activations; W4A8 and FP8 W8A8; the
   bit-stream GEMV for INT3/5/6 sym/asym and MXFP6 E2M3/E3M2) against the pure-torch
   reference run on the same GPU, each check isolated so one failure does not stop the rest;
3. times Llama-7B-like shapes with CUDA graphs (weights rotated through > 256 MB so L2
   does not serve them): batch-1 achieved bandwidth and batch 16/64/256 TFLOP/s, next to
   torch.matmul in fp16 and bf16 in the same run, with ratios; the bit-stream GEMVs at
   batch 1 and 8 next to the INT4 GEMV (achieved GB/s and the ratio to INT4's GB/s);
   then prints a final table.
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # weight [N, K]
PEAK_BW = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s (HBM, vendor figures)
ROTATE_BYTES = 256 * 2**20
BITSTREAM = ("int3", "int3_asym", "int5", "int5_asym", "int6", "int6_asym", "fp6_e2m3", "fp6_e3m2")
BITS = {"int3": 3, "int5": 5, "int6": 6, "fp6_e2m3": 6, "fp6_e3m2": 6}


def _ops() -> Any:
    import ptq.exporters.cuda as cuda_pkg

    return cuda_pkg


def make_weight(fmt: str, n: int, k: int, dev: torch.device, real: bool) -> Any:
    """A PackedWeight: quantized from random data (real) or random bits (timing only)."""
    from ptq.exporters.cuda.packing import PackedWeight, pack_qtensor
    from ptq.formats import (
        FP4_E2M1,
        FP6_E2M3,
        FP6_E3M2,
        FP8_E4M3,
        INT3,
        INT4,
        INT5,
        INT6,
        INT8,
        PerChannel,
        PerGroup,
        QuantFormat,
        quantize,
    )

    fmts = {
        "int4": QuantFormat(INT4, PerGroup(128)),
        "int4_asym": QuantFormat(INT4, PerGroup(128), symmetric=False),
        "nvfp4": QuantFormat(FP4_E2M1, PerGroup(16), scale_format="e4m3", global_scale=True),
        "mxfp4": QuantFormat(FP4_E2M1, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
        "int8": QuantFormat(INT8, PerChannel()),
        "fp8": QuantFormat(FP8_E4M3, PerChannel()),
        "fp6_e2m3": QuantFormat(FP6_E2M3, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
        "fp6_e3m2": QuantFormat(FP6_E3M2, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
    }
    for name, el in (("int3", INT3), ("int5", INT5), ("int6", INT6)):
        fmts[name] = QuantFormat(el, PerGroup(128), scale_format="fp16")
        fmts[f"{name}_asym"] = QuantFormat(el, PerGroup(128), symmetric=False, scale_format="fp16")
    if real:
        w = torch.randn(n, k, device=dev) * 0.02
        return pack_qtensor(quantize(w, fmts[fmt]), scale_dtype=torch.float16)
    rnd = lambda *s, lo=0, hi=255, dt=torch.uint8: torch.randint(lo, hi, s, device=dev).to(dt)  # noqa: E731
    if fmt == "int4":
        packed = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), device=dev, dtype=torch.int32)
        return PackedWeight("int4", packed, torch.rand(n, k // 128, device=dev).half() * 0.01, 128)
    if fmt == "nvfp4":
        return PackedWeight(
            "nvfp4",
            rnd(n, k // 2),
            rnd(n, k // 16, lo=0x30, hi=0x50).view(torch.float8_e4m3fn),
            16,
            weight_global_scale=torch.tensor([1000.0], device=dev),
        )
    if fmt == "mxfp4":
        return PackedWeight("mxfp4", rnd(n, k // 2), rnd(n, k // 32, lo=118, hi=124), 32)
    if fmt == "fp8":
        w8 = rnd(n, k, lo=0, hi=0x7E).view(torch.float8_e4m3fn)
        return PackedWeight("fp8", w8, torch.rand(n, 1, device=dev) * 0.01, k)
    if fmt in BITSTREAM:
        name = fmt.removesuffix("_asym")
        packed = rnd(n, k * BITS[name] // 8, hi=256)
        if name.startswith("fp6"):
            return PackedWeight(name, packed, rnd(n, k // 32, lo=118, hi=124), 32)
        scale = torch.rand(n, k // 128, device=dev).half() * 0.01
        zp = rnd(n, k // 128, lo=-3, hi=3, dt=torch.int8) if fmt.endswith("_asym") else None
        return PackedWeight(name, packed, scale, 128, weight_zero_point=zp)
    raise ValueError(fmt)


def call(
    p: Any, x: torch.Tensor, act: str, out_dtype: torch.dtype, x_scale: Any = None
) -> torch.Tensor:
    """One quantized linear through torch.ops.ptq (weight-only, w4a8 or w8a8)."""
    ops = torch.ops.ptq
    if act == "fp8":
        if p.format == "fp8":
            return ops.qlinear_fp8_w8a8(x, x_scale, p.weight, p.weight_scale, out_dtype, None)
        return ops.qlinear_w4a8(
            x,
            x_scale,
            p.weight,
            p.weight_scale,
            p.weight_zero_point,
            p.weight_global_scale,
            p.format,
            p.group_size,
            out_dtype,
            None,
        )
    if p.format == "int4":
        return ops.qlinear_int4(
            x, p.weight, p.weight_scale, p.weight_zero_point, p.group_size, None
        )
    if p.format == "nvfp4":
        return ops.qlinear_nvfp4(x, p.weight, p.weight_scale, p.weight_global_scale, None)
    if p.format == "mxfp4":
        return ops.qlinear_mxfp4(x, p.weight, p.weight_scale, None)
    if p.format in BITS:
        return ops.qlinear_bitstream(
            x, p.weight, p.weight_scale, p.weight_zero_point, p.format, p.group_size, None
        )
    return ops.qlinear_per_channel(x, p.weight, p.weight_scale, None)


def reference(
    p: Any, x: torch.Tensor, act: str, out_dtype: torch.dtype, x_scale: Any = None
) -> torch.Tensor:
    from ptq.exporters.cuda import reference as ref

    if p.format == "int4":
        w = ref.dequantize_int4(p.weight, p.weight_scale, p.weight_zero_point, p.group_size)
    elif p.format == "nvfp4":
        w = ref.dequantize_nvfp4(p.weight, p.weight_scale, p.weight_global_scale)
    elif p.format == "mxfp4":
        w = ref.dequantize_mxfp4(p.weight, p.weight_scale)
    elif p.format in BITS:
        k = x.shape[-1]
        w = ref.dequantize_bitstream(
            p.weight, p.weight_scale, p.weight_zero_point, p.format, p.group_size, k
        )
    else:
        w = ref.dequantize_per_channel(p.weight, p.weight_scale)
    xf = ref.decode_fp8_activations(x, x_scale) if act == "fp8" else x.float()
    return (xf @ w.t()).to(out_dtype)


def direct(
    p: Any, x: torch.Tensor, act: str, out_dtype: torch.dtype, x_scale: Any, split: int
) -> torch.Tensor:
    """The kernel launched directly with a forced split-K (1: the non-split GEMM path)."""
    from ptq.exporters.cuda.launch import run_qlinear

    fmt = "int4_asym" if p.format == "int4" and p.weight_zero_point is not None else p.format
    per_channel = p.format in ("int8", "fp8")
    return run_qlinear(
        fmt,
        x,
        p.weight,
        out_dtype,
        p.group_size,
        weight_scale=None if per_channel else p.weight_scale,
        zero_point=p.weight_zero_point,
        global_scale=p.weight_global_scale,
        row_scale=p.weight_scale if per_channel else None,
        x_scale=x_scale,
        split_k=split,
    )


def check_one(
    p: Any, fmt: str, act: str, dt: torch.dtype, m: int, split: int | None
) -> tuple[str, str, str]:
    """One kernel path against the reference: (name, PASS/FAIL/ERROR, detail)."""
    from ptq.exporters.cuda.reference import quantize_fp8_per_token

    per_channel = p.format in ("int8", "fp8")
    n = p.weight.shape[0]
    k = p.weight.shape[1] if per_channel else p.weight_scale.shape[1] * p.group_size
    a_name = "fp8" if act == "fp8" else str(dt)[6:]
    name = f"{fmt:9s} act={a_name:8s} out={str(dt)[6:]:8s} M={m:3d} N={n} K={k}"
    name += f" split={split or 'auto'}"
    try:
        x = torch.randn(m, k, device=p.weight.device, dtype=dt)
        xs = None
        if act == "fp8":
            x, xs = quantize_fp8_per_token(x)
        got = (
            call(p, x, act, dt, xs) if split is None else direct(p, x, act, dt, xs, split)
        ).float()
        want = reference(p, x, act, dt, xs).float()
        torch.cuda.synchronize()
        err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
        tol = 1e-2 if dt == torch.float16 else 2.5e-2
        ok = math.isfinite(err) and err <= tol
        return name, "PASS" if ok else "FAIL", f"rel max err {err:.2e} (tol {tol:.0e})"
    except Exception as exc:
        return name, "ERROR", f"{type(exc).__name__}: {str(exc)[:160]}"


def check_all(dev: torch.device) -> list[tuple[str, str, str]]:
    """Every kernel path against the reference; returns (name, status, detail) rows."""
    rows: list[tuple[str, str, str]] = []
    cases = []
    for fmt in ("int4", "int4_asym", "nvfp4", "mxfp4", "int8", "fp8"):
        for dt in (torch.float16, torch.bfloat16):
            cases.append((fmt, "w", dt))
    for fmt in ("int4", "int4_asym", "nvfp4", "mxfp4", "fp8"):
        for dt in (torch.float16, torch.bfloat16):
            cases.append((fmt, "fp8", dt))
    for fmt in BITSTREAM:  # GEMV only; M = 16 checks the reference fallback
        for dt in (torch.float16, torch.bfloat16):
            cases.append((fmt, "w", dt))
    for fmt, act, dt in cases:
        for n, k in ((300, 512), (1024, 2048)):
            try:
                torch.manual_seed(0)
                p = make_weight(fmt, n, k, dev, real=True)
            except Exception as exc:
                rows.append((f"{fmt} {act} {n}x{k}", "ERROR", f"quantize: {exc}"))
                continue
            batches = (1, 5, 8, 16) if fmt in BITSTREAM else (1, 5, 16, 48, 256)
            for m in batches:
                for split in (None,) if m <= 8 or fmt in BITSTREAM else (None, 1):
                    rows.append(check_one(p, fmt, act, dt, m, split))
    return rows


def graph_time(fn: Callable[[int], Any], copies: int, iters: int = 40) -> float:
    """Seconds per call of fn(i) (i picks the weight copy), timed from a CUDA graph replay."""
    for i in range(3):
        fn(i % copies)
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for i in range(iters):
                    fn(i % copies)
        torch.cuda.current_stream().wait_stream(stream)
        run: Callable[[], Any] = graph.replay
        per = iters
    except Exception:

        def run() -> None:
            for i in range(iters):
                fn(i % copies)

        per = iters
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 5
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (reps * per)


def nbytes(p: Any) -> int:
    ts = [p.weight, p.weight_scale, p.weight_zero_point, p.weight_global_scale]
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _copies(bytes_one: int) -> int:
    return max(1, math.ceil(ROTATE_BYTES / bytes_one))


def time_dense(x: torch.Tensor, n: int) -> float:
    """Seconds per torch.matmul(x, W^T) with dense W [n, K] in x's dtype, rotated past L2."""
    k = x.shape[-1]
    ws = [torch.randn(n, k, device=x.device, dtype=x.dtype) for _ in range(_copies(n * k * 2))]
    return graph_time(lambda i: torch.matmul(x, ws[i].t()), len(ws))


def time_ptq(fmt: str, act: str, x: torch.Tensor, n: int) -> tuple[float, int]:
    """(seconds per call, bytes moved) of one ptq kernel, weights rotated past L2."""
    from ptq.exporters.cuda.reference import quantize_fp8_per_token

    k, dev = x.shape[-1], x.device
    p0 = make_weight(fmt, n, k, dev, real=False)
    ws = [p0] + [make_weight(fmt, n, k, dev, real=False) for _ in range(_copies(nbytes(p0)) - 1)]
    xa, xs = quantize_fp8_per_token(x) if act == "fp8" else (x, None)
    t = graph_time(lambda i: call(ws[i], xa, act, x.dtype, xs), len(ws))
    moved = nbytes(p0) + xa.numel() * xa.element_size() + x.shape[0] * n * 2
    return t, moved


def _row(
    label: str, n: int, k: int, m: int, dt: torch.dtype, t: float, moved: int, peak: float
) -> str:
    bw, tf = moved / t, 2 * m * n * k / t / 1e12
    return (
        f"N={n:5d} K={k:5d} M={m:3d} {str(dt)[6:]:8s} {label:19s} {t * 1e6:8.1f} us "
        f"{bw / 1e9:7.0f} GB/s ({bw / peak:5.1%}) {tf:6.1f} TFLOP/s"
    )


def bench(dev: torch.device, peak_bw: float) -> list[str]:
    """Timing rows: torch.matmul and each ptq variant per shape, dtype and batch."""
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    variants: list[tuple[str, str]] = [("int4", "w"), ("nvfp4", "w"), ("mxfp4", "w"), ("fp8", "w")]
    variants += [("int4", "fp8"), ("nvfp4", "fp8"), ("fp8", "fp8")]
    for n, k in SHAPES:
        for dt in (torch.float16, torch.bfloat16):
            for m in (1, 16, 64, 256):
                x = torch.randn(m, k, device=dev, dtype=dt)
                try:
                    t_dense = time_dense(x, n)
                    moved = (n * k + m * k + m * n) * 2
                    emit(_row("torch.matmul", n, k, m, dt, t_dense, moved, peak_bw))
                except Exception as exc:
                    emit(f"N={n} K={k} M={m} {dt} torch.matmul: ERROR {exc}")
                    continue
                for fmt, act in variants:
                    if act == "fp8" and dt != torch.bfloat16:
                        continue  # W4A8 / W8A8 timed once per shape (bf16 output)
                    label = f"ptq {fmt}" + (
                        "" if act == "w" else ("-w8a8" if fmt == "fp8" else "-w4a8")
                    )
                    try:
                        t, moved = time_ptq(fmt, act, x, n)
                        row = _row(label, n, k, m, dt, t, moved, peak_bw)
                        emit(f"{row}  vs torch {t_dense / t:5.2f}x")
                    except Exception as exc:
                        emit(f"N={n} K={k} M={m} {dt} {label}: ERROR {str(exc)[:160]}")
                torch.cuda.empty_cache()
    return lines


def bench_bitstream(dev: torch.device, peak_bw: float) -> list[str]:
    """Bit-stream GEMVs (batch 1 and 8, fp16) next to the INT4 GEMV: GB/s and ratio."""
    lines: list[str] = []
    for n, k in SHAPES:
        for m in (1, 8):
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            try:
                t4, moved4 = time_ptq("int4", "w", x, n)
            except Exception as exc:
                lines.append(f"N={n} K={k} M={m} ptq int4: ERROR {str(exc)[:160]}")
                continue
            lines.append(_row("ptq int4", n, k, m, x.dtype, t4, moved4, peak_bw))
            print(lines[-1], flush=True)
            for fmt in BITSTREAM:
                try:
                    t, moved = time_ptq(fmt, "w", x, n)
                    row = _row(f"ptq {fmt}", n, k, m, x.dtype, t, moved, peak_bw)
                    lines.append(f"{row}  GB/s vs int4 {(moved / t) / (moved4 / t4):5.2f}x")
                except Exception as exc:
                    lines.append(f"N={n} K={k} M={m} ptq {fmt}: ERROR {str(exc)[:160]}")
                print(lines[-1], flush=True)
            torch.cuda.empty_cache()
    return lines


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: skipping the ptq CUDA kernel check (nothing to run)")
        return 0
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = next((v for key, v in PEAK_BW.items() if key in name), 3.35e12)
    print(
        f"device: {name} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}), "
        f"peak HBM assumed {peak / 1e12:.2f} TB/s",
        flush=True,
    )
    t0 = time.time()
    try:
        from ptq.exporters.cuda.build import load_extension

        _ops()
        load_extension(verbose=False)
        print(f"build: OK in {time.time() - t0:.1f} s", flush=True)
    except Exception:
        print("build: FAILED\n" + traceback.format_exc(), flush=True)
        return 1
    rows = check_all(dev)
    for r in rows:
        print(f"{r[1]:5s} {r[0]}  {r[2]}", flush=True)
    perf: list[str] = []
    for run in (bench_bitstream, bench):  # the new kernels first: the bench may time out
        try:
            perf += run(dev, peak)
        except Exception:
            perf += [f"{run.__name__} crashed:\n" + traceback.format_exc()]
    print("\n==== final table: correctness ====")
    bad = [r for r in rows if r[1] != "PASS"]
    print(f"{len(rows) - len(bad)}/{len(rows)} checks passed")
    for r in bad:
        print(f"  {r[1]:5s} {r[0]}  {r[2]}")
    print("\n==== final table: speed (CUDA-graph timed, weights rotated past L2) ====")
    for line in perf:
        print(line)
    print(f"\ntotal {time.time() - t0:.0f} s")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
