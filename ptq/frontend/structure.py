"""The structural model of a network, read from its captured block graph.

One :class:`ModelStructure` per run answers what the passes and exporters need to know
about a model without guessing module names (``docs/invariants.md`` invariant 8, ``docs/structure.md``):

* the repeated blocks (:func:`ptq.frontend.blocks.find_blocks`) and, per block
  structure, a :class:`BlockStructure` found on the captured graph of one
  representative (:mod:`ptq.frontend.structure_graph`): the norm -> linears groups
  (q/k/v or a fused qkv, gate/up or a fused gate_up, a MoE block's router, experts and
  shared expert), the linear -> linear groups (v -> o with grouped-query heads,
  up -> down of every gated MLP), the linears writing to the residual stream, the norms
  reading it, each norm's style (RMSNorm ``w``, Gemma's ``1 + w``, LayerNorm ``w, b``),
  attention (where keys and values leave for the cache, rotary or not), routers;
* the outer part (module walk): embeddings writing the residual stream, final norm,
  head, tied or not.

Names are relative to the block in :class:`BlockStructure`; :meth:`ModelStructure.block`
gives them prefixed for block ``i``. What the graph shows a pass cannot do (a norm whose
output feeds something other than linears, a norm writing to the residual stream) is
kept as a *problem* naming the module; a pass that needs the property raises it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

NormStyle = Literal["rms", "rms_1p", "layer"]
"""``rms``: ``w * x / rms(x)``; ``rms_1p``: ``(1 + w) * x / rms(x)`` (Gemma);
``layer``: ``w * (x - mean) / std + b`` (LayerNorm)."""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}{name}" if name else prefix.rstrip(".")


@dataclass(frozen=True)
class LinearGroup:
    """A producer and the weights that read its output.

    Reader input channel ``c`` is producer channel ``map(c)``. With grouped-query
    attention ``o_proj`` reads ``num_heads`` heads of which each block of ``n_rep``
    shares one ``v_proj`` head: ``map(h * head_dim + d) = (h // n_rep) * head_dim + d``.

    Attributes:
        producer: Module name of the norm or weight whose output is read.
        kind: ``norm`` or ``linear``.
        readers: Every weight reading the producer's output (routers included: they are
            transformed with the others but stay in high precision).
        n_rep: Query heads per KV head (1 when channels map one to one).
        head_dim: Channels per head (only used when ``n_rep > 1``).
        rows: The producer's output rows the readers see, ``[start, end)`` (a slice of
            a fused projection: the v rows of ``qkv_proj``, the up rows of
            ``gate_up_proj``); None: all of them.
        style: ``kind == "norm"``: how the norm applies its weight (:data:`NormStyle`).
    """

    producer: str
    kind: Literal["norm", "linear"]
    readers: tuple[str, ...]
    n_rep: int = 1
    head_dim: int = 1
    rows: tuple[int, int] | None = None
    style: NormStyle = "rms"

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

    def prefixed(self, prefix: str) -> LinearGroup:
        return replace(
            self,
            producer=_join(prefix, self.producer),
            readers=tuple(_join(prefix, r) for r in self.readers),
        )


@dataclass(frozen=True)
class CachePoint:
    """Where an attention's keys or values are taken for the KV cache.

    Attributes:
        module: The module whose output is the cached tensor (before RoPE for keys):
            ``k_proj``/``v_proj``, a fused ``qkv_proj`` (with ``rows``) or a key norm.
        rows: Output channels of ``module`` that are the keys/values (fused qkv).
    """

    module: str
    rows: tuple[int, int] | None = None

    def prefixed(self, prefix: str) -> CachePoint:
        return replace(self, module=_join(prefix, self.module))


@dataclass(frozen=True)
class Attention:
    """One attention op of a block.

    Attributes:
        module: The module that runs it (KV-cache scales are exported under it).
        key, value: Where keys and values are cached.
        head_dim: Channels per head.
        rotary: Keys are rotated by position (RoPE) before the cache.
    """

    module: str
    key: CachePoint
    value: CachePoint
    head_dim: int
    rotary: bool

    def prefixed(self, prefix: str) -> Attention:
        return replace(
            self,
            module=_join(prefix, self.module),
            key=self.key.prefixed(prefix),
            value=self.value.prefixed(prefix),
        )


@dataclass(frozen=True)
class BlockStructure:
    """What the graph of one block shows (names relative to the block, or prefixed).

    Attributes:
        norm_groups: Norm -> readers groups, in forward order (norms whose output only
            feeds weights).
        value_groups: v -> o groups (one per attention op).
        gated_groups: up -> down groups (one per gated MLP or expert).
        residual_norms: Norms reading the residual stream (each must be a norm group
            for rotation).
        writers: Weights whose output is added to the residual stream.
        attention: Attention ops (KV cache).
        routers: Weights whose output routes (softmax/top-k/sigmoid gates): kept in
            high precision.
        norm_styles: Style of every norm of the block (q/k norms included).
        problems: Why a residual-stream rotation cannot be fused (module named).
    """

    norm_groups: tuple[LinearGroup, ...] = ()
    value_groups: tuple[LinearGroup, ...] = ()
    gated_groups: tuple[LinearGroup, ...] = ()
    residual_norms: tuple[str, ...] = ()
    writers: tuple[str, ...] = ()
    attention: tuple[Attention, ...] = ()
    routers: tuple[str, ...] = ()
    norm_styles: dict[str, NormStyle] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    def prefixed(self, prefix: str) -> BlockStructure:
        def j(name: str) -> str:
            return _join(prefix, name)

        return BlockStructure(
            norm_groups=tuple(g.prefixed(prefix) for g in self.norm_groups),
            value_groups=tuple(g.prefixed(prefix) for g in self.value_groups),
            gated_groups=tuple(g.prefixed(prefix) for g in self.gated_groups),
            residual_norms=tuple(map(j, self.residual_norms)),
            writers=tuple(map(j, self.writers)),
            attention=tuple(a.prefixed(prefix) for a in self.attention),
            routers=tuple(map(j, self.routers)),
            norm_styles={j(n): s for n, s in self.norm_styles.items()},
            problems=tuple(f"{prefix}{p}" for p in self.problems),
        )

    @property
    def groups(self) -> tuple[LinearGroup, ...]:
        """Every group: norm groups, then v -> o, then up -> down."""
        return self.norm_groups + self.value_groups + self.gated_groups

    @property
    def down_projs(self) -> tuple[str, ...]:
        """Weights whose input is a gated product ``act(gate) * up`` (MLP down projections)."""
        return tuple(r for g in self.gated_groups for r in g.readers)

    def norm_group(self, norm: str) -> LinearGroup | None:
        """The norm group of ``norm``, if its output only feeds weights."""
        return next((g for g in self.norm_groups if g.producer == norm), None)


@dataclass(frozen=True)
class Outer:
    """The part of a decoder LM outside its blocks (found by a module walk).

    Attributes:
        embeddings: Embeddings whose rows are added to the residual stream (token and,
            for GPT-2/OPT, learned positions).
        final_norm: The norm before the head (None if none was found).
        final_style: Its style.
        head: The output projection (None if none).
        tied: The head shares the token embedding's weight.
        problems: Why a residual-stream rotation cannot be fused here.
    """

    embeddings: tuple[str, ...] = ()
    final_norm: str | None = None
    final_style: NormStyle = "rms"
    head: str | None = None
    tied: bool = False
    problems: tuple[str, ...] = ()


@dataclass
class ModelStructure:
    """The structural model of a network (see the module docstring).

    Attributes:
        block_path: Dotted path of the repeated blocks (None: no blocks, one unit).
        kinds: Block index -> index of its representative in ``blocks``.
        blocks: One :class:`BlockStructure` per block structure (relative names).
        outer: The outer part.
        hidden_size: Width of the residual stream (0 when unknown).
    """

    block_path: str | None = None
    kinds: dict[int, int] = field(default_factory=dict)
    blocks: dict[int, BlockStructure] = field(default_factory=dict)
    outer: Outer = field(default_factory=Outer)
    hidden_size: int = 0

    @property
    def n_blocks(self) -> int:
        return len(self.kinds)

    def block_prefix(self, i: int) -> str:
        assert self.block_path is not None
        return f"{self.block_path}.{i}."

    def block(self, i: int) -> BlockStructure:
        """Block ``i``'s structure with full names."""
        if self.block_path is None or i not in self.kinds:
            raise ValueError(f"the model has no block {i}")
        return self.blocks[self.kinds[i]].prefixed(self.block_prefix(i))

    def all_blocks(self) -> list[BlockStructure]:
        return [self.block(i) for i in sorted(self.kinds)]

    def routers(self) -> set[str]:
        """Every router of the model (full names)."""
        return {r for b in self.all_blocks() for r in b.routers}

    def rotation_problems(self) -> list[str]:
        """Why a residual-stream rotation cannot be fused into this model (empty: it can)."""
        out = list(self.outer.problems)
        for rep in sorted(self.blocks):
            out += list(self.blocks[rep].prefixed(self.block_prefix(rep)).problems)
        if self.block_path is None:
            out.append("the model has no repeated blocks")
        return out
