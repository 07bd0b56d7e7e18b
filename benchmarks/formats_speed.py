"""Fake-quant throughput of ptq formats vs torch's native FP8 cast and a plain copy.

For a 4096 x 4096 fp32 weight, GB/s of fp32 input (16M x 4 bytes / time) for ptq's
INT4-g128, FP8 (per channel), MXFP4 and NVFP4 fake-quant, next to
``x.to(torch.float8_e4m3fn).float()`` and ``x.clone()``; ratios are to ``clone``.

Run: ``.venv/bin/python benchmarks/formats_speed.py [--device cuda] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from ptq.formats import fake_quantize, preset


def _time(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    x = torch.randn(args.size, args.size, device=device, generator=None)
    gbytes = x.numel() * 4 / 1e9
    cases: dict[str, Callable[[], torch.Tensor]] = {
        "clone (baseline)": x.clone,
        "torch fp8 e4m3 cast": lambda: x.to(torch.float8_e4m3fn).float(),
        "ptq int4_g128": lambda: fake_quantize(x, preset("int4_g128")),
        "ptq fp8_e4m3_channel": lambda: fake_quantize(x, preset("fp8_e4m3_channel")),
        "ptq mxfp4": lambda: fake_quantize(x, preset("mxfp4")),
        "ptq nvfp4": lambda: fake_quantize(x, preset("nvfp4")),
    }
    print(f"device={device} weight={args.size}x{args.size} fp32, best of {args.repeats}")
    print(f"{'case':<24}{'ms':>10}{'GB/s':>10}{'vs clone':>10}{'vs fp8 cast':>13}")
    times = {name: _time(fn, device, args.repeats) for name, fn in cases.items()}
    base, cast = times["clone (baseline)"], times["torch fp8 e4m3 cast"]
    for name, t in times.items():
        print(f"{name:<24}{t * 1e3:>10.2f}{gbytes / t:>10.2f}{base / t:>10.3f}{cast / t:>13.3f}")


if __name__ == "__main__":
    main()
