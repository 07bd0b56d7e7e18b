"""Fold batch-norms into the convolutions before them, as the first pass of a CNN pipeline.

Every conv whose only consumer is a ``BatchNorm2d`` (found on the captured graph,
:func:`ptq.frontend.fold.conv_bn_pairs`) becomes the folded conv
``W' = W a``, ``b' = (b - mu) a + beta`` with ``a = gamma / sqrt(var + eps)`` and the
batch-norm an identity (:func:`ptq.frontend.fold.fold_conv_bn`): what an integer runtime
executes, so the weight pass quantizes ``W'``. The model must be in memory and in eval
mode; the capture runs on the first calibration batch. The folded ``[conv, bn]`` pairs
are recorded (``records["fold_batch_norm"]``): an output rebuilds the folded module tree
from them (:mod:`ptq.models.module_loader`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ptq.pipeline import Pass, PassContext, QuantState


@dataclass(frozen=True, kw_only=True)
class FoldBatchNormConfig:
    """Folding has no knobs: every conv -> batch-norm pair of the graph is folded."""


class FoldBatchNormPass(Pass):
    """Fold every conv -> batch-norm pair (before any weight is quantized)."""

    name: ClassVar[str] = "fold_batch_norm"
    ensures: ClassVar[tuple[str, ...]] = ("batch_norm_folded",)
    needs_calibration: ClassVar[bool] = True
    before_weights: ClassVar[bool] = True

    def __init__(self, config: FoldBatchNormConfig | None = None) -> None:
        self.config = config or FoldBatchNormConfig()

    def prepare(self, state: QuantState, ctx: PassContext) -> None:
        from ptq.frontend.fold import fold_all_conv_bn

        if any(p.is_meta for p in state.model.parameters()):
            raise ValueError("fold_batch_norm needs the model's weights in memory")
        calibration = ctx.calibration
        if calibration is None or len(calibration) == 0:
            raise ValueError("fold_batch_norm captures the model on the first calibration batch")
        first = calibration[0]
        example: tuple[Any, ...] | Mapping[str, Any] = (
            first if isinstance(first, Mapping) else (first,)
        )
        folded = fold_all_conv_bn(state.model, example)
        ctx.records["fold_batch_norm"] = [[conv, bn] for conv, bn in folded]

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        """Nothing per unit: the folding happened in :meth:`prepare`."""
