"""Time our GPTQ per layer on SmolLM2 and 7B-class shapes, next to RTN.

For each ``[N, K]`` layer: random ``W``, correlated calibration inputs (low rank plus
noise, uneven feature scales), ``H = 2 X^T X / n``; then RTN (``fake_quantize``) and
GPTQ (dynamic groups; static groups with act-order) are timed and their output errors
``||(W - Q) X^T||`` compared. Times exclude forming ``H``.

Run: ``.venv/bin/python benchmarks/gptq_speed.py [--device cuda] [--format int4_g64]``
(on a shared, busy CPU set ``OMP_NUM_THREADS=1``: spinning OpenMP threads thrash).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TypeVar

import torch

from ptq.formats import FP4_E2M1, INT4, PerChannel, PerGroup, QuantFormat, fake_quantize
from ptq.passes.gptq_math import GPTQConfig, gptq_quantize

FORMATS = {
    "int4_g64": QuantFormat(INT4, PerGroup(64)),
    "int4_channel": QuantFormat(INT4, PerChannel()),
    "nvfp4": QuantFormat(FP4_E2M1, PerGroup(16), scale_format="e4m3", global_scale=True),
    "mxfp4": QuantFormat(FP4_E2M1, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
}
SHAPES = ((1536, 576), (576, 1536), (4096, 4096))
T = TypeVar("T")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _problem(n: int, k: int, rows: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, 64, generator=g) @ torch.randn(64, k, generator=g)
    x = (x + 0.1 * torch.randn(rows, k, generator=g)) * torch.linspace(0.2, 3.0, k)
    w, x = w.to(device), x.to(device)
    return w, x, (2.0 * x.T @ x / rows).double()


def _timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--format", choices=sorted(FORMATS), default="int4_g64")
    parser.add_argument("--rows", type=int, default=2048, help="calibration rows")
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    device = torch.device(args.device)
    fmt = FORMATS[args.format]
    print(f"device={device} format={args.format} threads={torch.get_num_threads()}")
    head = (
        f"{'layer N x K':>12} | {'RTN s':>7} {'GPTQ s':>7} {'x RTN':>6} {'GPTQ-ao s':>9} |"
        f" {'err RTN':>9} {'err GPTQ':>9} {'ratio':>6} {'err GPTQ-ao':>11} {'ratio':>6}"
    )
    print(head)
    print("-" * len(head))
    for n, k in SHAPES:
        w, x, h = _problem(n, k, args.rows, device)
        rtn, t_rtn = _timed(lambda: fake_quantize(w, fmt), device)  # noqa: B023
        dyn = GPTQConfig(block_size=args.block_size)
        ao = GPTQConfig(block_size=args.block_size, act_order=True, scale_mode="static")
        ours, t_ours = _timed(lambda: gptq_quantize(w, h, fmt, layer_name="l", config=dyn), device)  # noqa: B023
        ord_, t_ao = _timed(lambda: gptq_quantize(w, h, fmt, layer_name="l", config=ao), device)  # noqa: B023

        def err(q: torch.Tensor) -> float:
            return float(((w - q) @ x.T).norm())  # noqa: B023

        e_rtn, e_ours, e_ao = err(rtn), err(ours.weight), err(ord_.weight)
        print(
            f"{f'{n} x {k}':>12} | {t_rtn:7.3f} {t_ours:7.2f} {t_ours / t_rtn:6.0f} {t_ao:9.2f} |"
            f" {e_rtn:9.4g} {e_ours:9.4g} {e_ours / e_rtn:6.3f} {e_ao:11.4g} {e_ao / e_rtn:6.3f}"
        )


if __name__ == "__main__":
    main()
