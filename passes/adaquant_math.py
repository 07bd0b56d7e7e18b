"""AdaQuant: optimise a layer's weights, scales and bias for its output, then round.

Hubara et al., "Accurate Post Training Quantization With Small Calibration Sets" (ICML
2021; arXiv 2020 "Improving Post Training Neural Quantization: Layer-wise Calibration
and Integer Programming"). For a layer ``y = f(x; W, b)`` and cached calibration inputs
``X`` it solves

    min_{W', s, b'} || f(X; W, b) - f(X; Q_s(W'), b') ||^2

with Adam, where ``Q_s`` is the format's quantizer with per-block scales ``s``. The
rounding uses a straight-through estimator; the scale is log-parametrised,
``s = sign(s_0) exp(log_s)``, keeping the sign of the initial scale (the full-range
rule's scales may be negative), and projected onto the scale format's grid with a
straight-through estimator too; ``W' = W + s_0 * delta`` moves in units of the initial
step ``s_0`` so one learning rate fits every layer. Power-of-two scale formats (E8M0, pow2) keep their initial scales.

The default learning rates (``3e-4`` steps for ``delta``, ``3e-3`` for ``log s``) were
chosen on SmolLM2-135M layers (INT3/INT4 g64, NVFP4): Adam moves every element by about
the learning rate per step whatever its gradient, so with ``1e-2`` the straight-through
weights random-walk across several grid points in 500 steps and the layer ends *worse*
than round-to-nearest (v_proj output error 0.106 vs RTN 0.102), while ``3e-4`` reaches
0.033. As a safeguard the result is compared with the starting point (round-to-nearest
with the initial scales) on all cached rows, and the starting point is kept when the
optimised solution is not better.

The paper's bias and batch-norm tuning (re-estimating each output channel's mean and
scale after quantization) is :class:`ptq.passes.bias_correction.BiasCorrectionPass` with
``gain=True`` (CLI ``--stats-tuning``), which runs after any weight method.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptq.formats import QTensor, QuantFormat
from ptq.formats.scales import encode_scale
from ptq.passes.quant_with_scales import (
    BlockScales,
    block_scales,
    build_qtensor,
    dequantize_with_scale,
    expand_blocks,
    fake_quantize_ste,
    round_with_scale,
)

LayerForward = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class AdaQuantConfig:
    """AdaQuant options.

    Args:
        iterations: Adam steps.
        batch_size: Calibration rows per step.
        lr_weight: Learning rate of ``delta`` (units of the initial quantization step).
        lr_scale: Learning rate of ``log s``.
        lr_bias: Learning rate of the bias shift (units of the target outputs' RMS).
        learn_scales: Optimise scales (ignored for power-of-two scale formats).
        learn_bias: Optimise the bias (when the layer has one).
        seed: Seeds the batch sampling.
    """

    iterations: int = 500
    batch_size: int = 256
    lr_weight: float = 3e-4
    lr_scale: float = 3e-3
    lr_bias: float = 1e-3
    learn_scales: bool = True
    learn_bias: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError("AdaQuantConfig.iterations and batch_size must be >= 1")
        if min(self.lr_weight, self.lr_scale, self.lr_bias) <= 0:
            raise ValueError("AdaQuantConfig learning rates must be > 0")


@dataclass(frozen=True)
class AdaQuantResult:
    """The quantized weight, its fp32 dequantization, the tuned bias and losses.

    ``loss_start``/``loss_end`` are the output MSE on all cached rows of the starting
    point and of the returned solution; ``kept_start`` says the optimised solution was
    no better than the start and was discarded.
    """

    qtensor: QTensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    loss_start: float
    loss_end: float
    time_s: float
    kept_start: bool = False


def _linear(w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w, b)


def _stored_scale(s: torch.Tensor, fmt: QuantFormat, gs: torch.Tensor | None) -> torch.Tensor:
    """Stored scale on ``fmt.scale_format``'s grid for the effective scale ``s``."""
    return encode_scale(s if gs is None else s * gs, fmt.scale_format)


def _effective(stored: torch.Tensor, gs: torch.Tensor | None) -> torch.Tensor:
    return stored if gs is None else stored / gs


def adaquant_layer(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    fmt: QuantFormat,
    *,
    bias: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    forward: LayerForward | None = None,
    config: AdaQuantConfig | None = None,
) -> AdaQuantResult:
    """AdaQuant one layer on cached ``inputs`` (batched along dim 0).

    Args:
        weight: 2-D weight ``[N, K]`` (reshape conv kernels to 2-D inside ``forward``).
        inputs: Cached layer inputs.
        fmt: Target format.
        bias: Optional bias, tuned as well when ``config.learn_bias``.
        targets: FP outputs for ``inputs``; default ``forward(weight, bias, inputs)``.
        forward: ``forward(w, b, x) -> y``; default a linear layer.
        config: Options.
    """
    cfg = config or AdaQuantConfig()
    start = time.perf_counter()
    fwd = forward or _linear
    if weight.dim() != 2:
        raise ValueError(f"adaquant_layer needs a 2-D weight, got shape {tuple(weight.shape)}")
    w0 = weight.detach().float()
    b0 = None if bias is None else bias.detach().float()
    x = inputs.detach().float()
    with torch.no_grad():
        y = fwd(w0, b0, x) if targets is None else targets.detach().float()
    if y.shape[0] != x.shape[0] or x.shape[0] == 0:
        raise ValueError(f"AdaQuant inputs ({x.shape[0]}) and targets ({y.shape[0]}) must match")
    if fmt.channel_scale:
        raise ValueError(
            "AdaQuant learns one scale per block; formats with a per-row channel scale "
            "(ZeroQuant-FP M2) are not supported: use GPTQ or AdaRound"
        )
    init = block_scales(w0, fmt)
    gs = init.global_scale
    s0_full, zp = init.expand(w0.shape)
    sign = torch.where(init.effective() < 0, -1.0, 1.0)
    log_s = torch.log(init.effective().abs()).clone()
    learn_scales = cfg.learn_scales and fmt.scale_format not in ("e8m0", "pow2")
    delta = torch.zeros_like(w0, requires_grad=True)
    groups: list[dict[str, object]] = [{"params": [delta], "lr": cfg.lr_weight}]
    if learn_scales:
        log_s.requires_grad_(True)
        groups.append({"params": [log_s], "lr": cfg.lr_scale})
    b_unit = float(y.pow(2).mean().sqrt()) or 1.0
    db = None
    if b0 is not None and cfg.learn_bias:
        db = torch.zeros_like(b0, requires_grad=True)
        groups.append({"params": [db], "lr": cfg.lr_bias})
    opt = torch.optim.Adam(groups)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

    def current() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        s = sign * torch.exp(log_s)
        s = s + (_effective(_stored_scale(s, fmt, gs), gs) - s).detach()
        s_full = expand_blocks(s, init.block, w0.shape)
        w_q = fake_quantize_ste(w0 + s0_full * delta, s_full, fmt.element, zp)
        b = b0 if db is None or b0 is None else b0 + b_unit * db
        return s, w_q, b

    def solution() -> tuple[torch.Tensor, BlockScales, torch.Tensor, torch.Tensor | None, float]:
        """Codes, scales, dequantized weight, bias and full-data MSE of the current point."""
        s, _, b = current()
        stored = _stored_scale(s, fmt, gs)
        scales = BlockScales(stored, init.block, init.zero_point, gs)
        s_full, _ = scales.expand(w0.shape)
        codes = round_with_scale(w0 + s0_full * delta, s_full, fmt.element, zp)
        deq = dequantize_with_scale(codes, s_full, zp)
        mse = float((fwd(deq, b, x) - y).pow(2).mean())
        return codes, scales, deq, None if b is None else b.detach().clone(), mse

    with torch.no_grad():
        first = solution()
    for _ in range(cfg.iterations):
        idx = torch.randint(x.shape[0], (min(cfg.batch_size, x.shape[0]),), generator=gen)
        idx = idx.to(x.device)
        _, w_q, b = current()
        loss = (fwd(w_q, b, x[idx]) - y[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = solution()
    kept_start = not last[4] < first[4]
    codes, scales, deq, b_out, mse = first if kept_start else last
    return AdaQuantResult(
        qtensor=build_qtensor(codes, scales, fmt),
        weight=deq,
        bias=b_out,
        loss_start=first[4],
        loss_end=mse,
        time_s=time.perf_counter() - start,
        kept_start=kept_start,
    )
