"""LoRC: low-rank compensation of the weight quantization error (Yao et al., ZeroQuant-V2).

With ``E = W - Q(W)`` and its SVD ``E = U S V^T``, the rank-``r`` factors

    U_r = U[:, :r] sqrt(S_r)        [out, r]
    V_r = sqrt(S_r) V[:, :r]^T      [r, in]

give the best rank-``r`` approximation ``U_r V_r`` of ``E`` (Eckart-Young); both are
stored in a low precision (fp16, or INT8 per row) and the layer computes
``y = fq(x) Q(W)^T + (x V_r^T) U_r^T`` (:meth:`ptq.qlinear.QuantLinear.set_lorc`).

Design: LoRC needs the FP weights that the weight pass discards, so :class:`LoRCPass`
*wraps* the weight pass: on each unit of the block-wise runner it snapshots the unit's
planned layers' FP weights, runs the inner pass (RTN, GPTQ, ZeroQuant-FP ...) on the
unit, then attaches the factors with :func:`apply_lorc`, so later blocks calibrate on
activations of the compensated model. Callers holding their own snapshot may call
:func:`apply_lorc` directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ptq.formats import INT8, PerChannel, QuantFormat, fake_quantize
from ptq.pipeline import Pass, PassContext, QuantState
from ptq.qlinear import QuantLinear
from ptq.scheme import matches_any
from ptq.steps import record_step

FactorFormat = Literal["fp16", "bf16", "int8", "fp32"]
FACTOR_FORMATS: tuple[FactorFormat, ...] = ("fp16", "bf16", "int8", "fp32")


def round_factor(t: torch.Tensor, fmt: FactorFormat) -> torch.Tensor:
    """Put a factor on its storage grid (fp32 values): fp16/bf16 casts or INT8 per row."""
    if fmt == "fp16":
        return t.half().float()
    if fmt == "bf16":
        return t.bfloat16().float()
    if fmt == "int8":
        return fake_quantize(t.float(), QuantFormat(INT8, PerChannel()))
    return t.float()


def lorc_factors(
    e: torch.Tensor, rank: int, fmt: FactorFormat = "fp16"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r, V_r)`` of the error ``E`` [out, in] (SVD in float64, then rounded to ``fmt``)."""
    if rank < 1 or rank > min(e.shape):
        raise ValueError(f"LoRC rank must be in [1, {min(e.shape)}], got {rank}")
    u, s, vh = torch.linalg.svd(e.double(), full_matrices=False)
    root = s[:rank].sqrt()
    u_r = u[:, :rank] * root[None, :]
    v_r = root[:, None] * vh[:rank]
    return round_factor(u_r, fmt), round_factor(v_r, fmt)


def snapshot_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Copies of the named layers' FP weights (before a weight pass replaces them)."""
    out = {}
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, QuantLinear) or not isinstance(m, nn.Linear):
            raise ValueError(f"{n} is not a floating-point nn.Linear; snapshot before quantizing")
        out[n] = m.weight.detach().float().clone()
    return out


def apply_lorc(
    model: nn.Module,
    fp_weights: dict[str, torch.Tensor],
    ranks: dict[str, int],
    fmt: FactorFormat = "fp16",
) -> dict[str, float]:
    """Attach rank-``ranks[name]`` factors of ``W_fp - Q(W)`` to each QuantLinear.

    Returns:
        Relative Frobenius error ``||E - U_r V_r|| / ||W||`` per layer.
    """
    errors = {}
    for name, r in ranks.items():
        m = model.get_submodule(name)
        if not isinstance(m, QuantLinear):
            raise ValueError(f"{name} is not a QuantLinear; run the weight pass before LoRC")
        w = fp_weights[name]
        e = w - m.weight.detach().float()
        u, v = lorc_factors(e, min(r, min(e.shape)), fmt)
        m.set_lorc(u, v)
        errors[name] = float((e - u @ v).norm() / w.norm().clamp(min=1e-30))
    return errors


@dataclass(frozen=True, kw_only=True)
class LoRCConfig:
    """Args:
    rank: Rank for every planned layer (capped at ``min(out, in)``).
    rank_overrides: ``(pattern, rank)`` pairs (names or ``re:``); first match wins,
        rank 0 means no compensation for that layer.
    factor_format: Storage of ``U_r``/``V_r``: ``fp16`` (default), ``bf16``, ``int8``
        (per-row symmetric), or ``fp32``.
    """

    rank: int = 8
    rank_overrides: tuple[tuple[str, int], ...] = ()
    factor_format: FactorFormat = "fp16"

    def __post_init__(self) -> None:
        if self.rank < 0 or any(r < 0 for _, r in self.rank_overrides):
            raise ValueError(f"LoRC ranks must be >= 0, got {self.rank} / {self.rank_overrides}")
        if self.factor_format not in FACTOR_FORMATS:
            raise ValueError(
                f"unknown LoRC factor format {self.factor_format!r}; valid: {FACTOR_FORMATS}"
            )

    def rank_for(self, name: str) -> int:
        for pattern, r in self.rank_overrides:
            if matches_any(name, [pattern]):
                return r
        return self.rank


class LoRCPass(Pass):
    """Run ``inner`` (a weight pass) and compensate its error with low-rank factors."""

    name: ClassVar[str] = "lorc"

    def __init__(self, inner: Pass, config: LoRCConfig | None = None) -> None:
        self.inner = inner
        self.config = config or LoRCConfig()
        self.requires = inner.requires  # type: ignore[misc]
        self.ensures = (*inner.ensures, "lorc")  # type: ignore[misc]
        self.needs_calibration = inner.needs_calibration  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"lorc({self.config!r}, inner={self.inner!r})"

    def inner_passes(self) -> list[Pass]:
        return [self.inner]

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        assert state.unit is not None
        ranks = {n: self.config.rank_for(n) for n in state.unit.layers}
        ranks = {n: r for n, r in ranks.items() if r > 0}
        fp = snapshot_weights(state.model, list(ranks))
        self.inner.run_unit(state, ctx)
        errors = apply_lorc(state.model, fp, ranks, self.config.factor_format)
        for name in errors:
            record_step(ctx.records, name, self.name)
        record = ctx.records.setdefault(
            "lorc",
            {"factor_format": self.config.factor_format, "rank": {}, "relative_residual": {}},
        )
        record["rank"].update(ranks)
        record["relative_residual"].update(errors)
