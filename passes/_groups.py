"""Llama-family structure read from the Hugging Face module tree.

Smoothing and rotation need to know which linears read the output of which module:
``input_layernorm -> {q,k,v}_proj``, ``post_attention_layernorm -> {gate,up}_proj``,
``v_proj -> o_proj`` and ``up_proj -> down_proj``. A per-channel scale ``s`` on the
readers' input can be folded into the producer (the norm weight, or the producer's
rows) because each reader input channel is a copy of one producer output channel.

This is the one place that knows the layout; the FX pattern discovery in
``ptq.frontend`` will replace :func:`llama_groups` and :func:`llama_residual`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class LinearGroup:
    """A producer and the linears that read its output.

    Reader input channel ``c`` is producer channel ``map(c)``. With grouped-query
    attention ``o_proj`` reads ``num_heads`` heads of which each block of ``n_rep``
    shares one ``v_proj`` head: ``map(h * head_dim + d) = (h // n_rep) * head_dim + d``.

    Attributes:
        producer: Module name of the norm or linear whose output is read.
        kind: ``norm`` (RMSNorm with a ``weight``) or ``linear``.
        readers: Names of the linears reading the producer's output.
        n_rep: Query heads per KV head (1 when channels map one to one).
        head_dim: Channels per head (only used when ``n_rep > 1``).
    """

    producer: str
    kind: Literal["norm", "linear"]
    readers: tuple[str, ...]
    n_rep: int = 1
    head_dim: int = 1

    def to_reader(self, s: torch.Tensor) -> torch.Tensor:
        """Expand a producer-channel vector to the readers' input channels."""
        if self.n_rep == 1:
            return s
        heads = s.reshape(-1, 1, self.head_dim).expand(-1, self.n_rep, self.head_dim)
        return heads.reshape(-1)

    def to_producer(self, v: torch.Tensor) -> torch.Tensor:
        """Reduce a reader-channel statistic to producer channels by ``max``."""
        if self.n_rep == 1:
            return v
        return v.reshape(-1, self.n_rep, self.head_dim).amax(dim=1).reshape(-1)


@dataclass(frozen=True)
class Residual:
    """The residual stream of a Llama model: what rotation touches besides the blocks."""

    embed: str
    final_norm: str
    head: str
    layers: tuple[str, ...]


def tensor_attr(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` as a tensor (``weight``, ``bias``, a buffer).

    Raises:
        ValueError: The attribute is missing or not a tensor.
    """
    t = getattr(module, name, None)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor {name!r}")
    return t


def child(module: nn.Module, name: str) -> nn.Module:
    """``module.<name>`` as a submodule (typed), or a ValueError naming it."""
    m = getattr(module, name, None)
    if not isinstance(m, nn.Module):
        raise ValueError(f"{type(module).__name__} has no submodule {name!r}")
    return m


def _layers(inner: nn.Module) -> nn.ModuleList:
    layers = getattr(inner, "layers", None)
    assert isinstance(layers, nn.ModuleList)
    return layers


def _decoder(model: nn.Module) -> tuple[str, nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} is not a Llama-family causal LM "
            "(expected model.model.layers); smoothing/rotation support only that layout"
        )
    return "model", inner


def llama_groups(model: nn.Module) -> list[LinearGroup]:
    """The four producer -> readers groups of every decoder layer, in forward order.

    Raises:
        ValueError: The model does not have the Llama module layout.
    """
    _, inner = _decoder(model)
    config = getattr(model, "config", None)
    heads = int(getattr(config, "num_attention_heads", 1))
    kv_heads = int(getattr(config, "num_key_value_heads", heads) or heads)
    groups: list[LinearGroup] = []
    for i, layer in enumerate(_layers(inner)):
        p = f"model.layers.{i}"
        for part in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, part):
                raise ValueError(f"{p} has no {part}: not a Llama-family decoder layer")
        attn = child(layer, "self_attn")
        o_in = int(tensor_attr(child(attn, "o_proj"), "weight").shape[1])
        head_dim = int(getattr(attn, "head_dim", o_in // heads))
        groups += [
            LinearGroup(
                f"{p}.input_layernorm",
                "norm",
                tuple(f"{p}.self_attn.{n}_proj" for n in "qkv"),
            ),
            LinearGroup(
                f"{p}.self_attn.v_proj",
                "linear",
                (f"{p}.self_attn.o_proj",),
                n_rep=heads // kv_heads,
                head_dim=head_dim,
            ),
            LinearGroup(
                f"{p}.post_attention_layernorm",
                "norm",
                (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"),
            ),
            LinearGroup(f"{p}.mlp.up_proj", "linear", (f"{p}.mlp.down_proj",)),
        ]
    return groups


def llama_residual(model: nn.Module) -> Residual:
    """Embedding, final norm, LM head and decoder layer names of a Llama model."""
    _, inner = _decoder(model)
    if not hasattr(inner, "embed_tokens") or not hasattr(inner, "norm"):
        raise ValueError("model.model lacks embed_tokens/norm: not a Llama-family model")
    if not isinstance(getattr(model, "lm_head", None), nn.Linear):
        raise ValueError("model has no nn.Linear lm_head: not a Llama-family causal LM")
    n = len(_layers(inner))
    return Residual(
        embed="model.embed_tokens",
        final_norm="model.norm",
        head="lm_head",
        layers=tuple(f"model.layers.{i}" for i in range(n)),
    )


def foldable(model: nn.Module, group: LinearGroup) -> bool:
    """Whether a per-channel scale on ``group``'s readers can be folded into its producer:
    not ``up_proj -> down_proj`` when ``down_proj``'s input is rotated online (the
    Hadamard sits between them)."""
    if group.kind == "linear" and not group.producer.endswith("v_proj"):
        mlp = model.get_submodule(group.producer.rpartition(".")[0])
        return not getattr(mlp, "online_hadamard", False)
    return True


def fold_scales(model: nn.Module, group: LinearGroup, s: torch.Tensor) -> None:
    """``Y = (X diag(s)^-1)(W diag(s))^T``: divide the producer's output channels by
    ``s`` (a norm's weight, or a producer linear's rows and bias) and multiply every
    reader's input columns by ``s`` (expanded to reader channels); in float64, so the FP
    model's outputs are unchanged up to rounding."""
    producer = model.get_submodule(group.producer)
    sd = s.double()
    with torch.no_grad():
        pw = tensor_attr(producer, "weight")
        if group.kind == "norm":
            pw.copy_(pw.double() / sd)
        else:
            pw.copy_(pw.double() / sd[:, None])
            if getattr(producer, "bias", None) is not None:
                pb = tensor_attr(producer, "bias")
                pb.copy_(pb.double() / sd)
        sr = group.to_reader(sd)
        for name in group.readers:
            w = tensor_attr(model.get_submodule(name), "weight")
            w.copy_(w.double() * sr[None, :])
