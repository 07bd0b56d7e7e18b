"""QuaRot residual-stream rotation, fused offline into the weights (Ashkboos et al., 2024).

With ``Q`` orthogonal and activations as rows, a weight reading the residual stream
computes ``x W^T = (x Q)(W Q)^T``, and one writing to it gives ``(x W^T) Q = x (Q^T W)^T``.
A norm commutes with ``Q`` once its scale is folded into its readers
(``||x Q|| = ||x||``). Which weights read and write the stream, which norms read it and
how each applies its weight come from the captured graph (:mod:`ptq.frontend.structure`),
so the same steps serve every decoder family whose blocks are ``x + f(norm(x))``:

1. every norm reading the stream folds its scale into its readers, ``W <- W diag(w)``
   (``1 + w`` for Gemma-style norms, which then hold ``w = 0``; a MoE router is a reader
   like the experts), and becomes the identity; the final norm folds into the LM head;
   a tied LM head is untied first;
2. ``E <- E Q`` for every embedding writing the stream (token and learned positions);
   ``W <- W Q`` for the readers and the head; ``W <- Q^T W`` (and ``b <- b Q``) for the
   writers (``o_proj``/``down_proj``, every expert's down projection, GPT-2's ``c_proj``);
3. optionally an online Hadamard before every MLP down projection: ``x <- x H^T`` at
   run time and ``W_down <- W_down H^T`` offline, which spreads the MLP's outliers.

LayerNorm models (OPT, GPT-2) subtract the mean, which does not commute with ``Q``.
As in SliceGPT (Ashkboos et al., 2024), every writer and embedding is first *centred*
(``W <- W - mean_rows(W)``, ``b <- b - mean(b)``, each embedding row made zero-mean),
which leaves every LayerNorm's output unchanged and makes the stream zero-mean; ``Q`` is
then chosen with ``Q 1 = 1`` (a randomised Hadamard composed with the reflection taking
its image of ``1`` back to ``1``), so the stream stays zero-mean and each LayerNorm acts
as an RMSNorm. A LayerNorm's bias is folded into its readers' biases, or kept in the
norm as ``(b / w) Q`` when a reader has none. A block whose norms write to the stream
(Gemma 2/3's post-norms) cannot be rotated: the pass refuses it, naming the norm.

``Q = diag(d) H / sqrt(n)`` is a seeded randomised Hadamard (:mod:`ptq.passes.hadamard`).
The FP model's outputs are unchanged up to rounding. Through the block-wise runner: the
head is untied in ``prepare`` (before any weight is loaded), embeddings rotated in the
``prologue``, each block folded and rotated when the runner reaches it, the final norm
folded into the rotated head on the outer unit; no step needs more than one block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ptq.frontend.norms import norm_bias, norm_scale, set_norm_scale
from ptq.frontend.structure import BlockStructure, ModelStructure, NormStyle
from ptq.passes._groups import (
    bias_of,
    block_structure,
    structure_of,
    tensor_attr,
    weight_view,
)
from ptq.passes.hadamard import hadamard_matrix, hadamard_transform, random_hadamard
from ptq.passes.online_hadamard import add_online_hadamard
from ptq.pipeline import Pass, PassContext, QuantState


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


def _float_weight(model: nn.Module, name: str) -> torch.Tensor:
    m = model.get_submodule(name)
    if hasattr(m, "qweight"):
        raise ValueError(
            f"{name} is {type(m).__name__}, already quantized: rotation must run before "
            "weight quantization"
        )
    return weight_view(m)


def untie_head(model: nn.Module, head: str, embed: str) -> bool:
    """Give ``head`` its own weight if it shares the embedding's; True if it did.

    Works on a meta skeleton too (the new parameter is then a meta placeholder that the
    weight source fills with the stored embedding).
    """
    lm = model.get_submodule(head)
    emb = model.get_submodule(embed)
    if lm.weight is not emb.weight:
        return False
    lm.weight = nn.Parameter(tensor_attr(emb, "weight").detach().clone(), requires_grad=False)
    config = getattr(model, "config", None)
    if config is not None:
        config.tie_word_embeddings = False
    return True


def mean_preserving(q: torch.Tensor) -> torch.Tensor:
    """``Q R`` with ``R`` the reflection taking ``u = 1 / sqrt(n)`` to ``Q^T u``.

    ``Q R`` is orthogonal and ``Q R u = u``, so a row ``x`` with zero mean stays
    zero-mean: ``(x Q R) 1 = x (Q R 1) = x 1 = 0``.
    """
    n = q.shape[0]
    u = torch.full((n,), n**-0.5, dtype=q.dtype)
    w = q.T @ u - u
    if float(w.norm()) < 1e-12:
        return q
    w = w / w.norm()
    return q - 2.0 * (q @ w)[:, None] * w[None, :]


def fold_norm(
    model: nn.Module,
    norm: str,
    style: NormStyle,
    readers: tuple[str, ...],
    q: torch.Tensor | None = None,
) -> None:
    """Fold norm ``norm``'s scale (and LayerNorm bias) into ``readers``; the norm becomes
    the identity. ``q``: the rotation the stream will carry (a kept bias is rotated)."""
    module = model.get_submodule(norm)
    w = norm_scale(module, style)
    bias = norm_bias(module)
    b = None if bias is None else bias.detach().double()
    for r in readers:
        lin = model.get_submodule(r)
        weight = _float_weight(model, r)
        rb = bias_of(lin)
        if b is not None and rb is not None:
            _set(rb, rb.double() + weight.double() @ b)
        _set(weight, weight.double() * w[None, :])
    set_norm_scale(module, style, torch.ones_like(w))
    if bias is None or b is None:
        return
    if all(bias_of(model.get_submodule(r)) is not None for r in readers):
        _set(bias, torch.zeros_like(b))
        return
    if bool(((w == 0) & (b != 0)).any()):
        raise ValueError(f"{norm}: a zero scale with a non-zero bias cannot be folded")
    kept = torch.where(w == 0, torch.zeros_like(b), b / w)
    _set(bias, kept @ q if q is not None else kept)


def _centre_rows(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Make a writer's outputs zero-mean over the hidden channels (its rows)."""
    _set(weight, weight.double() - weight.double().mean(0, keepdim=True))
    if bias is not None:
        _set(bias, bias.double() - bias.double().mean())


def rotate_block(model: nn.Module, block: BlockStructure, q: torch.Tensor, centre: bool) -> None:
    """Readers of the stream ``W <- W Q``, writers ``W <- Q^T W`` (norms folded first)."""
    for norm in block.residual_norms:
        group = block.norm_group(norm)
        assert group is not None
        for r in group.readers:
            w = _float_weight(model, r)
            _set(w, w.double() @ q)
    for name in block.writers:
        w = _float_weight(model, name)
        b = bias_of(model.get_submodule(name))
        if centre:
            _centre_rows(w, b)
        _set(w, q.T @ w.double())
        if b is not None:
            _set(b, b.double() @ q)


@dataclass(frozen=True, kw_only=True)
class RotationConfig:
    """Args:
    online_down_proj: Add the online Hadamard before every MLP down projection (the
        runtime must apply it too: vLLM and ONNX Runtime do not, ``--target ptq``).
    """

    online_down_proj: bool = False


class RotationPass(Pass):
    """Fuse a seeded randomised Hadamard into the FP model's residual stream."""

    name: ClassVar[str] = "rotation"
    ensures: ClassVar[tuple[str, ...]] = ("rotated",)
    before_weights: ClassVar[bool] = True
    touches_outer: ClassVar[bool] = True

    def __init__(self, config: RotationConfig | None = None) -> None:
        self.config = config or RotationConfig()
        self._q: torch.Tensor | None = None
        self._centre = False

    def prepare(self, state: QuantState, ctx: PassContext) -> None:
        s = structure_of(state)
        problems = s.rotation_problems()
        if problems:
            raise ValueError(f"rotation cannot be fused into this model: {problems[0]}")
        outer = s.outer
        assert outer.head is not None and outer.embeddings
        untied = untie_head(state.model, outer.head, outer.embeddings[0]) if outer.tied else False
        styles = [outer.final_style] + [
            st
            for b in s.blocks.values()
            for n, st in b.norm_styles.items()
            if n in b.residual_norms
        ]
        self._centre = "layer" in styles
        q = random_hadamard(s.hidden_size, ctx.generator(salt=0x0A7))
        self._q = mean_preserving(q) if self._centre else q
        ctx.records["rotation"] = {
            "hidden_size": s.hidden_size,
            "untied_lm_head": untied,
            "online_down_proj": self.config.online_down_proj,
            "centred": self._centre,
        }
        if untied:
            ctx.logger.info("rotation: untied lm_head from the embeddings")

    def _rotation(self, device: torch.device) -> torch.Tensor:
        if self._q is None:
            raise ValueError("rotation: prepare() did not run")
        return self._q.to(device)

    def prologue_modules(self, state: QuantState) -> list[str]:
        return list(structure_of(state).outer.embeddings)

    def prologue(self, state: QuantState, ctx: PassContext) -> None:
        for name in structure_of(state).outer.embeddings:
            e = tensor_attr(state.model.get_submodule(name), "weight")
            rows = e.double() - e.double().mean(1, keepdim=True) if self._centre else e.double()
            _set(e, rows @ self._rotation(e.device))

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        unit = state.unit
        assert unit is not None
        model = state.model
        s: ModelStructure = structure_of(state)
        if unit.kind == "block":
            block = block_structure(state)
            first = model.get_submodule(block.residual_norms[0])
            q = self._rotation(tensor_attr(first, "weight").device)
            for norm in block.residual_norms:
                group = block.norm_group(norm)
                assert group is not None
                fold_norm(model, norm, group.style, group.readers, q)
            rotate_block(model, block, q, self._centre)
            if self.config.online_down_proj:
                for down in block.down_projs:
                    add_online_hadamard(model, down)
            return
        outer = s.outer
        assert outer.head is not None and outer.final_norm is not None
        head = _float_weight(model, outer.head)
        q = self._rotation(head.device)
        fold_norm(model, outer.final_norm, outer.final_style, (outer.head,), q)
        _set(head, head.double() @ q)


__all__ = [
    "RotationConfig",
    "RotationPass",
    "fold_norm",
    "hadamard_matrix",
    "hadamard_transform",
    "mean_preserving",
    "rotate_block",
    "untie_head",
]
