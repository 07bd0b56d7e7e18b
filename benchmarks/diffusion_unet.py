"""Low-bit FP weights on a diffusion UNet: format x method x timestep bucket, SQNR vs FP.

One run. The denoiser is :func:`ptq.models.diffusion.small_unet` (a random-init diffusers
``UNet2DConditionModel``, 32x32x4 latents, 83 convs and Linears; no weights download).
Calibration: ``--cal-trajectories`` DDIM trajectories of ``--cal-steps`` steps from random
latents and random encoder states (seed 0), as timestep-mixed batches
(:class:`ptq.models.diffusion.Trajectories`). Evaluation: ``--eval-trajectories`` *other*
trajectories (seed 1) of ``--eval-steps`` steps (so timesteps calibration never saw too);
at each step both models get the FP trajectory's inputs, and per timestep bucket the
table gives the SQNR (dB) and mean relative error of the denoiser output
(:mod:`ptq.models.denoiser_error`). "x0 SQNR" is the end-to-end figure: the quantized
model samples its own trajectory from the same ``x_T``, and its final latent is compared
with the FP one. Every row is ``ptq.quantize(unet, scheme, calibration=...)`` on a fresh
FP copy with the method's passes (:func:`ptq.compose.build_passes`); ``conv_in``
(``K = 4 * 3 * 3 = 36``, no group of 16 or 32 divides it) stays in floating point in every
row. "vs RTN" is the mean SQNR gain over the buckets, ours minus RTN's, same format.

Usage::

    .venv/bin/python benchmarks/diffusion_unet.py [--only SUBSTR] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch import nn

import ptq
from ptq.compose import build_passes
from ptq.formats.names import parse_format
from ptq.models.denoiser_error import BucketError, sqnr_db, timestep_errors
from ptq.models.diffusion import DiffusionInputs, Trajectories, small_unet
from ptq.scheme import Scheme

ROOT = Path(__file__).resolve().parent
FORMATS = {
    "FP8 E4M3 per-channel": "fp8_e4m3_channel",
    "FP4 E2M1 g32 (fp16 scales)": "fp4_e2m1_g32",
    "MXFP4 (E2M1 g32, E8M0 scales)": "mxfp4",
    "NVFP4 (E2M1 g16, E4M3 scales + fp32 global)": "nvfp4",
}
METHODS = {"RTN": "rtn", "GPTQ": "gptq", "AdaRound": "adaround"}


def row(
    fp: nn.Module,
    fmt: str,
    method: str,
    cal: list[dict[str, torch.Tensor]],
    held_out: Trajectories,
    inputs: DiffusionInputs,
    seed: int,
    buckets: int,
    knobs: dict[str, dict[str, int]],
) -> tuple[list[BucketError], float, float]:
    """Per-bucket errors, end-to-end x0 SQNR and quantization seconds of one row."""
    scheme = Scheme(name=fmt, weight=parse_format(fmt), ignore=("conv_in",))
    start = time.perf_counter()
    result = ptq.quantize(
        copy.deepcopy(fp), scheme, calibration=cal,
        pipeline=build_passes(scheme, method=method, knobs=knobs.get(method)), progress=False,
        log=lambda *_: None,
    )  # fmt: skip
    secs = time.perf_counter() - start
    assert result.model is not None
    errs = timestep_errors(fp, result.model, held_out, buckets)
    own = inputs.record(result.model, n=held_out.n, seed=seed)
    assert own.final is not None and held_out.final is not None
    return errs, sqnr_db(held_out.final, own.final), secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cal-trajectories", type=int, default=4)
    ap.add_argument("--cal-steps", type=int, default=8)
    ap.add_argument("--eval-trajectories", type=int, default=2)
    ap.add_argument("--eval-steps", type=int, default=16)
    ap.add_argument("--adaround-iterations", type=int, default=200)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--only", default="")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "diffusion_unet.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fp = small_unet()
    n_layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in fp.modules())
    cal_inputs = DiffusionInputs(steps=a.cal_steps)
    eval_inputs = DiffusionInputs(steps=a.eval_steps)
    cal = cal_inputs.record(fp, n=a.cal_trajectories, seed=0).calibration_batches()
    held_out = eval_inputs.record(fp, n=a.eval_trajectories, seed=1)
    knobs = {"adaround": {"iterations": a.adaround_iterations}}
    labels: list[str] = []
    lines: list[str] = []
    rtn_mean: dict[str, float] = {}
    for label, fmt in FORMATS.items():
        for method, key in METHODS.items():
            if a.only and a.only not in f"{fmt} {key}":
                continue
            errs, x0, secs = row(fp, fmt, key, cal, held_out, eval_inputs, 1, a.buckets, knobs)
            mean = sum(e.sqnr_db for e in errs) / len(errs)
            rtn_mean.setdefault(fmt, mean) if key == "rtn" else None
            gain = f"{mean - rtn_mean[fmt]:+.2f}" if fmt in rtn_mean else "-"
            if not labels:
                labels = [e.label for e in errs]
                lines += [
                    f"| format | method | {' | '.join(labels)} | x0 SQNR | vs RTN (dB) | "
                    "quant. seconds |",
                    "|---|---|" + "---|" * (len(labels) + 3),
                ]
            cells = " | ".join(f"{e.sqnr_db:.2f} ({e.rel_error:.3f})" for e in errs)
            lines.append(f"| {label} | {method} | {cells} | {x0:.2f} | {gain} | {secs:.1f} |")
            print(lines[-1], flush=True)
    doc = [
        "# Low-bit FP weights on a diffusion UNet (SQNR of the denoiser output vs FP)",
        "",
        f"`benchmarks/diffusion_unet.py` (torch threads {a.threads}). Denoiser: "
        f"`ptq.models.diffusion.small_unet` (random init, {n_layers} convs and Linears, "
        "`conv_in` kept in FP). Calibration: "
        f"{a.cal_trajectories} DDIM trajectories x {a.cal_steps} steps (seed 0), "
        f"timestep-mixed batches. Evaluation: {a.eval_trajectories} other trajectories x "
        f"{a.eval_steps} steps (seed 1), FP inputs at every step. AdaRound: "
        f"{a.adaround_iterations} iterations per layer. Cells: SQNR in dB "
        "(mean relative error ||y - y_q|| / ||y||) per timestep bucket; x0 SQNR: final "
        "latent of the quantized model's own trajectory vs FP's; vs RTN: mean bucket "
        "SQNR gain over RTN of the same format; quant. seconds: the whole "
        "`ptq.quantize` call (capture, plan, passes).",
        "",
        *lines,
    ]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(doc) + "\n")


if __name__ == "__main__":
    main()
