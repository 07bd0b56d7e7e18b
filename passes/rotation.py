"""QuaRot residual-stream rotation, fused offline into the weights (Ashkboos et al., 2024).

With ``Q`` orthogonal and activations as rows, a linear reading the residual stream
computes ``x W^T = (x Q)(W Q)^T``, and one writing to it gives ``(x W^T) Q = x (Q^T W)^T``.
RMSNorm commutes with ``Q`` once its scale is folded into the readers
(``||x Q|| = ||x||``). So, in this order:

1. fold every RMSNorm weight ``w`` into the linears that read it, ``W <- W diag(w)``,
   and set ``w <- 1`` (``input_layernorm -> q,k,v``; ``post_attention_layernorm ->
   gate,up``; final ``norm -> lm_head``); a tied LM head is untied first;
2. ``E <- E Q`` (embeddings); ``W <- W Q`` for q/k/v/gate/up/lm_head;
   ``W <- Q^T W`` (and ``b <- b Q``) for o_proj/down_proj;
3. optionally an online Hadamard before ``down_proj``: ``x <- x H^T`` at run time and
   ``W_down <- W_down H^T`` offline, which spreads the MLP's activation outliers.

``Q = diag(d) H / sqrt(n)`` is a seeded randomised Hadamard (:mod:`ptq.passes.hadamard`).
The FP model's outputs are unchanged up to rounding.

Through the block-wise runner: the head is untied in ``prepare`` (before any weight is
loaded), the embedding rotated in the ``prologue``, each block's norms folded and its
linears rotated when the runner reaches it, and the final norm folded into the rotated
head on the outer unit; no step needs more than one block in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ptq.passes._groups import child, llama_groups, llama_residual, tensor_attr
from ptq.passes.hadamard import hadamard_matrix, hadamard_transform, random_hadamard
from ptq.pipeline import Pass, PassContext, QuantState


class OnlineHadamardMLP(nn.Module):
    """A Llama MLP with a Hadamard on ``down_proj``'s input (children keep their names).

    ``forward(x) = down_proj(H(act(gate_proj(x)) * up_proj(x)))`` with ``H(a) = a H^T /
    sqrt(n)``; ``down_proj``'s weight must already hold ``W H^T``.
    """

    online_hadamard: ClassVar[bool] = True

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj = child(mlp, "gate_proj")
        self.up_proj = child(mlp, "up_proj")
        self.down_proj = child(mlp, "down_proj")
        self.act_fn = child(mlp, "act_fn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        y: torch.Tensor = self.down_proj(hadamard_transform(h))
        return y


def _linear(model: nn.Module, name: str) -> nn.Linear:
    m = model.get_submodule(name)
    if not isinstance(m, nn.Linear) or type(m) is not nn.Linear:
        raise ValueError(
            f"{name} is {type(m).__name__}, not a floating-point nn.Linear: rotation must "
            "run before weight quantization"
        )
    return m


def _set(p: nn.Parameter | torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        p.copy_(value.to(p.dtype))


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


def _fold(model: nn.Module, norm_name: str, readers: tuple[str, ...]) -> None:
    """``W <- W diag(w)`` for each reader of the norm, then ``w <- 1``."""
    norm = model.get_submodule(norm_name)
    w = tensor_attr(norm, "weight").detach().double()
    for r in readers:
        lin = _linear(model, r)
        _set(lin.weight, lin.weight.double() * w[None, :])
    _set(tensor_attr(norm, "weight"), torch.ones_like(w))


def fold_block_norms(model: nn.Module, prefix: str) -> None:
    """Fold block ``prefix``'s RMSNorms into the linears that read them."""
    for g in llama_groups(model):
        if g.kind == "norm" and g.producer.startswith(prefix):
            _fold(model, g.producer, g.readers)


def rotate_block(model: nn.Module, prefix: str, q: torch.Tensor) -> None:
    """Readers of the residual stream ``W <- W Q``, writers ``W <- Q^T W`` (norms folded)."""
    p = prefix.rstrip(".")
    readers = [f"{p}.self_attn.{n}_proj" for n in "qkv"] + [
        f"{p}.mlp.gate_proj",
        f"{p}.mlp.up_proj",
    ]
    for r in readers:
        lin = _linear(model, r)
        _set(lin.weight, lin.weight.double() @ q)
    for name in (f"{p}.self_attn.o_proj", f"{p}.mlp.down_proj"):
        lin = _linear(model, name)
        _set(lin.weight, q.T @ lin.weight.double())
        if lin.bias is not None:
            _set(lin.bias, lin.bias.double() @ q)


def add_online_down_proj_hadamard(model: nn.Module, prefix: str) -> None:
    """Wrap block ``prefix``'s MLP with :class:`OnlineHadamardMLP`; ``H^T`` into ``down_proj``."""
    p = prefix.rstrip(".")
    layer = model.get_submodule(p)
    if isinstance(child(layer, "mlp"), OnlineHadamardMLP):
        raise ValueError(f"{p}.mlp already has an online Hadamard")
    down = _linear(model, f"{p}.mlp.down_proj")
    h = hadamard_matrix(down.in_features).to(down.weight.device)
    _set(down.weight, down.weight.double() @ h.T)
    layer.mlp = OnlineHadamardMLP(child(layer, "mlp"))


@dataclass(frozen=True, kw_only=True)
class RotationConfig:
    """Args:
    online_down_proj: Add the online Hadamard before ``down_proj`` (the runtime must
        apply it too: exporter support is separate).
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

    def prepare(self, state: QuantState, ctx: PassContext) -> None:
        model = state.model
        res = llama_residual(model)
        llama_groups(model)  # the layout check, before any weight is loaded
        untied = untie_head(model, res.head, res.embed)
        hidden = int(tensor_attr(model.get_submodule(res.embed), "weight").shape[1])
        self._q = random_hadamard(hidden, ctx.generator(salt=0x0A7))
        ctx.records["rotation"] = {
            "hidden_size": hidden,
            "untied_lm_head": untied,
            "online_down_proj": self.config.online_down_proj,
        }
        if untied:
            ctx.logger.info("rotation: untied lm_head from the embeddings")

    def _rotation(self, device: torch.device) -> torch.Tensor:
        if self._q is None:
            raise ValueError("rotation: prepare() did not run")
        return self._q.to(device)

    def prologue(self, state: QuantState, ctx: PassContext) -> None:
        emb = state.model.get_submodule(llama_residual(state.model).embed)
        e = tensor_attr(emb, "weight")
        _set(e, e.double() @ self._rotation(e.device))

    def run_unit(self, state: QuantState, ctx: PassContext) -> None:
        unit = state.unit
        assert unit is not None
        model = state.model
        if unit.kind == "block":
            fold_block_norms(model, unit.prefix)
            lin = _linear(model, f"{unit.prefix}self_attn.q_proj")
            rotate_block(model, unit.prefix, self._rotation(lin.weight.device))
            if self.config.online_down_proj:
                add_online_down_proj_hadamard(model, unit.prefix)
            return
        res = llama_residual(model)
        _fold(model, res.final_norm, (res.head,))
        head = _linear(model, res.head)
        _set(head.weight, head.weight.double() @ self._rotation(head.weight.device))
