"""The module names the ONNX decoder emits, read from the model's structure.

:func:`llama_blocks` maps every block of a :class:`~ptq.frontend.structure.ModelStructure`
onto the pre-norm block the exporter writes (RMSNorm -> q/k/v -> RoPE attention -> o,
RMSNorm -> gate/up -> SwiGLU -> down), and refuses, naming the block and what differs,
a structure it cannot write (fused projections, key/query norms, LayerNorm or Gemma
norms, MoE routers, post-norms).
"""

from __future__ import annotations

from dataclasses import dataclass

from ptq.frontend.structure import BlockStructure, ModelStructure


@dataclass(frozen=True)
class BlockNames:
    """Full module names of one exported block."""

    input_norm: str
    q: str
    k: str
    v: str
    o: str
    post_norm: str
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class DecoderNames:
    """Full module names of the exported decoder."""

    embed: str
    blocks: tuple[BlockNames, ...]
    final_norm: str
    head: str


def _block(i: int, b: BlockStructure) -> BlockNames:
    def no(why: str) -> ValueError:
        return ValueError(
            f"block {i}: {why}; ONNX export writes pre-norm RMSNorm blocks with "
            "separate q/k/v and gate/up projections"
        )

    if b.problems:
        raise no(b.problems[0])
    if b.routers:
        raise no(f"router {b.routers[0]} (mixture of experts)")
    if len(b.residual_norms) != 2 or len(b.attention) != 1 or len(b.gated_groups) != 1:
        raise no(
            f"{len(b.residual_norms)} residual norms, {len(b.attention)} attention ops, "
            f"{len(b.gated_groups)} gated MLPs"
        )
    styles = {b.norm_styles.get(n) for n in b.residual_norms}
    if styles != {"rms"}:
        raise no(f"norms of style {sorted(s or '?' for s in styles)} (RMSNorm 'rms' only)")
    attn = b.attention[0]
    if attn.key.rows or attn.value.rows:
        raise no(f"fused q/k/v projection {attn.value.module}")
    if not attn.rotary or attn.key.module in b.norm_styles:
        raise no(
            f"keys through {attn.key.module} ({'no RoPE' if not attn.rotary else 'a key norm'})"
        )
    first, second = (b.norm_group(n) for n in b.residual_norms)
    vo, gated = b.value_groups[0] if b.value_groups else None, b.gated_groups[0]
    if first is None or second is None or vo is None or len(first.readers) != 3:
        raise no("an attention norm that does not feed exactly q, k and v")
    q = next(r for r in first.readers if r not in (attn.key.module, attn.value.module))
    gate = [r for r in second.readers if r != gated.producer]
    if gated.rows or len(second.readers) != 2 or len(gate) != 1:
        raise no("an MLP norm that does not feed exactly gate and up")
    return BlockNames(
        input_norm=first.producer, q=q, k=attn.key.module, v=attn.value.module, o=vo.readers[0],
        post_norm=second.producer, gate=gate[0], up=gated.producer, down=gated.readers[0],
    )  # fmt: skip


def llama_blocks(structure: ModelStructure) -> DecoderNames:
    """Names of every block and of the outer part, or a ValueError saying what differs."""
    outer = structure.outer
    if structure.block_path is None:
        raise ValueError("the model has no repeated blocks")
    if outer.problems:
        raise ValueError(outer.problems[0])
    if outer.final_norm is None or outer.head is None or len(outer.embeddings) != 1:
        raise ValueError("ONNX export needs one token embedding, a final norm and an LM head")
    if outer.final_style != "rms":
        raise ValueError(f"final norm {outer.final_norm} is not an RMSNorm")
    blocks = tuple(_block(i, b) for i, b in enumerate(structure.all_blocks()))
    return DecoderNames(outer.embeddings[0], blocks, outer.final_norm, outer.head)
