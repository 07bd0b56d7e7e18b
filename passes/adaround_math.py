"""AdaRound: learn whether each weight rounds up or down.

Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization" (ICML
2020). With fixed scales ``s`` each weight is ``W~ = s * clamp(floor(W / s) + h(V))``
where the rectified sigmoid ``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
(``zeta = 1.1``, ``gamma = -0.1``) is optimised with Adam on

    L = ||f(W) - f(W~)||^2 / L_0 + lambda * mean(1 - |2 h(V) - 1|^beta)

over cached calibration inputs; the regulariser is off during a warm-up (20 %), then
``beta`` anneals from 20 to 2, driving ``h`` to 0 or 1. We normalise the paper's loss
``||.||^2 + lambda' sum(.)`` by ``L_0``, the error of nearest rounding, so that one
``lambda`` (``lambda' = lambda L_0 / numel``) suits layers of any output scale. ``f`` is
the layer, or a whole block (BRECQ, Li et al., 2021) through the ``forward`` callable
of :func:`adaround_reconstruct`.

The grid generalises beyond integers: in element units ``y = W / s`` the candidates are
``lo`` (the grid value below ``y``) and ``lo + step``. Integers use ``lo = floor(y)``,
``step = 1``; minifloats use the ulp of ``y``'s binade, ``ulp = 2^(max(floor(log2|y|),
e_min) - M)``, ``lo = floor(y / ulp) * ulp``, so both candidates lie on the FP grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ptq.formats import FloatFormat, QTensor, QuantFormat
from ptq.passes.quant_with_scales import (
    BlockScales,
    block_scales,
    build_qtensor,
    dequantize_with_scale,
    element_bounds,
)

Forward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class AdaRoundConfig:
    """AdaRound options (defaults after the paper / BRECQ's implementation).

    Args:
        iterations: Adam steps (paper: 10k on GPU; 500 is a CPU default).
        batch_size: Calibration rows per step.
        lr: Adam learning rate of ``V`` (high because CPU runs are short).
        reg_weight: ``lambda`` of the (normalised) rounding regulariser.
        beta_start: ``beta`` right after warm-up.
        beta_end: ``beta`` at the last step.
        warmup: Fraction of steps without the regulariser.
        zeta: Stretch of the rectified sigmoid (upper).
        gamma: Stretch of the rectified sigmoid (lower).
        seed: Seeds the batch sampling.
    """

    iterations: int = 500
    batch_size: int = 256
    lr: float = 5e-2
    reg_weight: float = 10.0
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    zeta: float = 1.1
    gamma: float = -0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError("AdaRoundConfig.iterations and batch_size must be >= 1")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"AdaRoundConfig.warmup must be in [0, 1), got {self.warmup}")
        if not (self.gamma < 0.0 and self.zeta > 1.0):
            raise ValueError("AdaRoundConfig needs gamma < 0 and zeta > 1")
        if self.lr <= 0 or self.reg_weight < 0:
            raise ValueError("AdaRoundConfig.lr must be > 0 and reg_weight >= 0")


@dataclass(frozen=True)
class AdaRoundResult:
    """One weight's result: QTensor, its fp32 dequantization, final soft ``h`` and losses."""

    qtensor: QTensor
    weight: torch.Tensor
    h: torch.Tensor
    loss_start: float
    loss_end: float
    time_s: float

    def non_binary_fraction(self, tol: float = 1e-2) -> float:
        """Fraction of ``h`` further than ``tol`` from both 0 and 1."""
        return float(((self.h > tol) & (self.h < 1 - tol)).float().mean())


def rectified_sigmoid(V: torch.Tensor, zeta: float, gamma: float) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(V) * (zeta - gamma) + gamma, 0.0, 1.0)


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2h - 1|^beta)``: zero only when every ``h`` is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_at(step: int, cfg: AdaRoundConfig) -> float | None:
    """Annealed ``beta`` (linear from ``beta_start`` to ``beta_end``); None in warm-up."""
    start = int(cfg.warmup * cfg.iterations)
    if step < start:
        return None
    t = (step - start) / max(cfg.iterations - start, 1)
    return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * max(0.0, 1.0 - t)


@dataclass(frozen=True)
class RoundingGrid:
    """The two rounding candidates of every element, in element (code) units."""

    scales: BlockScales
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    lo: torch.Tensor
    step: torch.Tensor
    bounds: tuple[float, float]

    @staticmethod
    def from_weight(w: torch.Tensor, fmt: QuantFormat) -> RoundingGrid:
        """Fix scales as :func:`ptq.formats.quantize` would and find each ``lo``/``step``."""
        w = w.detach().float()
        scales = block_scales(w, fmt)
        scale, zp = scales.expand(w.shape)
        y = w / scale
        element = fmt.element
        if isinstance(element, FloatFormat):
            _, exp = torch.frexp(y.abs())
            e = torch.clamp(exp - 1, min=element.emin) - element.man_bits
            step = torch.ldexp(torch.ones_like(y), e.to(torch.int32))
            lo = torch.floor(y / step) * step
        else:
            y = y if zp is None else y + zp
            step = torch.ones_like(y)
            lo = torch.floor(y)
        return RoundingGrid(scales, scale, zp, lo, step, element_bounds(element))

    def fraction(self, w: torch.Tensor) -> torch.Tensor:
        """Position of ``w`` between its candidates, in ``[0, 1)``."""
        y = w.detach().float() / self.scale
        if self.zero_point is not None:
            y = y + self.zero_point
        return ((y - self.lo) / self.step).clamp(0.0, 1.0)

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """Grid values ``clamp(lo + h * step)`` (``h`` soft or hard)."""
        return torch.clamp(self.lo + h * self.step, *self.bounds) + 0.0

    def weight(self, h: torch.Tensor) -> torch.Tensor:
        """``W~ = (clamp(lo + h * step) - z) * s``, differentiable in ``h``."""
        return dequantize_with_scale(self.codes(h), self.scale, self.zero_point)


def _rec_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||pred - target||^2`` summed over the last dim, averaged over the batch."""
    return (pred - target).pow(2).sum(-1).mean()


def adaround_reconstruct(
    weights: Mapping[str, torch.Tensor],
    formats: Mapping[str, QuantFormat],
    forward: Forward,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: AdaRoundConfig | None = None,
) -> dict[str, AdaRoundResult]:
    """Jointly learn the rounding of several weights through ``forward`` (BRECQ-style).

    Args:
        weights: Named FP weights (2-D) to quantize.
        formats: A :class:`QuantFormat` per weight name.
        forward: ``forward(quantized_weights, x_batch) -> output``; must be
            differentiable in the weights.
        inputs: Cached inputs, batched along dim 0.
        targets: The FP outputs for ``inputs`` (same dim 0).
        config: Options.
    """
    cfg = config or AdaRoundConfig()
    start = time.perf_counter()
    if set(weights) != set(formats):
        raise ValueError(f"AdaRound weights {sorted(weights)} and formats {sorted(formats)} differ")
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise ValueError(
            f"AdaRound inputs ({inputs.shape[0]} rows) and targets ({targets.shape[0]} rows) "
            f"must be non-empty and match"
        )
    n = inputs.shape[0]
    grids = {name: RoundingGrid.from_weight(w, formats[name]) for name, w in weights.items()}
    V = {}
    for name, grid in grids.items():
        frac = grid.fraction(weights[name])
        ratio = (cfg.zeta - cfg.gamma) / (frac - cfg.gamma) - 1.0
        V[name] = (-torch.log(ratio)).requires_grad_(True)
    with torch.no_grad():
        ref_rows = slice(0, min(n, 4 * cfg.batch_size))
        nearest = {k: g.weight((g.fraction(weights[k]) >= 0.5).float()) for k, g in grids.items()}
        rec_ref = float(_rec_loss(forward(nearest, inputs[ref_rows]), targets[ref_rows]))
    rec_ref = rec_ref if rec_ref > 0 else 1.0
    n_elements = sum(v.numel() for v in V.values())
    opt = torch.optim.Adam(list(V.values()), lr=cfg.lr)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    losses: list[float] = []
    for step in range(cfg.iterations):
        idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen).to(inputs.device)
        hs = {k: rectified_sigmoid(v, cfg.zeta, cfg.gamma) for k, v in V.items()}
        w_tilde = {k: grids[k].weight(h) for k, h in hs.items()}
        rec = _rec_loss(forward(w_tilde, inputs[idx]), targets[idx]) / rec_ref
        beta = beta_at(step, cfg)
        loss = rec
        if beta is not None:
            reg = torch.stack([rounding_regularizer(h, beta) for h in hs.values()]).sum()
            loss = rec + cfg.reg_weight * reg / n_elements
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(rec.detach()))
    results = {}
    elapsed = time.perf_counter() - start
    for name, v in V.items():
        grid = grids[name]
        h = rectified_sigmoid(v.detach(), cfg.zeta, cfg.gamma)
        q = grid.codes((h >= 0.5).float())
        results[name] = AdaRoundResult(
            qtensor=build_qtensor(q, grid.scales, formats[name]),
            weight=dequantize_with_scale(q, grid.scale, grid.zero_point),
            h=h,
            loss_start=losses[0],
            loss_end=losses[-1],
            time_s=elapsed,
        )
    return results


def adaround_layer(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    fmt: QuantFormat,
    *,
    bias: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    config: AdaRoundConfig | None = None,
) -> AdaRoundResult:
    """AdaRound a linear layer ``y = x W^T + b`` on cached inputs ``x`` [..., K].

    ``targets`` defaults to the FP layer's outputs; pass the FP *model's* activations to
    correct for quantization error of earlier layers instead.
    """
    if weight.dim() != 2 or inputs.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"adaround_layer needs weight [N, K] and inputs [..., K], got {tuple(weight.shape)} "
            f"and {tuple(inputs.shape)}"
        )
    x = inputs.detach().reshape(-1, weight.shape[1]).float()
    w = weight.detach().float()
    b = None if bias is None else bias.detach().float()
    if targets is None:
        y = F.linear(x, w, b)
    else:
        y = targets.detach().reshape(-1, weight.shape[0]).float()

    def forward(ws: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return F.linear(xb, ws["weight"], b)

    return adaround_reconstruct({"weight": w}, {"weight": fmt}, forward, x, y, config)["weight"]
