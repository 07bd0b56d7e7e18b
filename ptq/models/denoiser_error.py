"""Per-timestep error of a quantized denoiser against the floating-point one.

At every step ``s`` of held-out trajectories (:class:`~ptq.models.diffusion.Trajectories`
recorded by the FP model) both models get the same inputs ``(x_{t_s}, t_s, c)`` and give
``y`` (FP) and ``y_q``. Steps are grouped into timestep buckets (``buckets`` equal
ranges of ``[0, 1000)``), and per bucket ``B``:

* SQNR (dB) ``= 10 log10( sum_B ||y||^2 / sum_B ||y - y_q||^2 )`` over every element of
  every step and sample in the bucket (signal-to-quantization-noise ratio);
* relative error ``= mean_{s, i in B} ||y_i - y_q,i|| / ||y_i||`` (per sample, averaged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ptq.models.diffusion import TRAIN_STEPS, Trajectories, denoise

__all__ = ["BucketError", "bucket_of", "sqnr_db", "timestep_errors"]


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """``10 log10(||ref||^2 / ||ref - out||^2)`` in float64 (inf when equal)."""
    return _sqnr(
        float(ref.double().pow(2).sum()), float((ref.double() - out.double()).pow(2).sum())
    )


def _sqnr(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


@dataclass(frozen=True)
class BucketError:
    """The error of one timestep bucket ``[low, high)``."""

    low: int
    high: int
    sqnr_db: float
    rel_error: float
    steps: int

    @property
    def label(self) -> str:
        return f"t {self.low}-{self.high - 1}"


def bucket_of(t: int, buckets: int, train_steps: int = TRAIN_STEPS) -> int:
    """Index of the bucket of timestep ``t`` among ``buckets`` equal ranges."""
    return min(int(t) * buckets // train_steps, buckets - 1)


@torch.no_grad()
def timestep_errors(
    fp: nn.Module, quantized: nn.Module, held_out: Trajectories, buckets: int = 4
) -> list[BucketError]:
    """SQNR and relative error of ``quantized`` vs ``fp`` per timestep bucket (module
    docstring); buckets no step falls in are left out, the rest ordered by timestep.

    Raises:
        ValueError: ``buckets < 1``.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be at least 1, got {buckets}")
    signal = [0.0] * buckets
    noise = [0.0] * buckets
    rel: list[list[float]] = [[] for _ in range(buckets)]
    steps = [0] * buckets
    for s in range(held_out.steps):
        inputs = held_out.step_inputs(s)
        y = denoise(fp, inputs).double()
        err = denoise(quantized, inputs).double() - y
        b = bucket_of(int(held_out.timesteps[s]), buckets)
        signal[b] += float(y.pow(2).sum())
        noise[b] += float(err.pow(2).sum())
        per_sample = err.flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1).clamp(min=1e-30)
        rel[b] += per_sample.tolist()
        steps[b] += 1
    width = TRAIN_STEPS // buckets
    out = []
    for b in range(buckets):
        if steps[b] == 0:
            continue
        sqnr = _sqnr(signal[b], noise[b])
        high = TRAIN_STEPS if b == buckets - 1 else (b + 1) * width
        out.append(BucketError(b * width, high, sqnr, sum(rel[b]) / len(rel[b]), steps[b]))
    return out
