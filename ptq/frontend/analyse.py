"""Build the :class:`~ptq.frontend.structure.ModelStructure` of a model from its capture.

Each block structure comes from the captured graph of its representative block
(:func:`ptq.frontend.structure_graph.analyse_block`); the outer part from a module walk
(the embeddings, the one norm and the head outside the blocks). A block whose capture
failed keeps the failure as its problem, so a pass that needs its structure names it.
"""

from __future__ import annotations

from torch import nn

from ptq.frontend.capture import Capture
from ptq.frontend.experts import ExpertMLPs, check_unfused
from ptq.frontend.norms import is_norm_module, norm_style
from ptq.frontend.structure import BlockStructure, ModelStructure, NormStyle, Outer
from ptq.frontend.structure_graph import analyse_block


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def outer_part(model: nn.Module, block_path: str | None, hidden: int | None = None) -> Outer:
    """The outer part of ``model`` (module walk; ``hidden`` defaults to the token
    embedding's width)."""
    hidden = _hidden_size(model) if hidden is None else hidden
    inside = f"{block_path}." if block_path else None

    def outside(name: str) -> bool:
        return bool(name) and (inside is None or not (name + ".").startswith(inside))

    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    token = get_in() if callable(get_in) else None
    head_mod = get_out() if callable(get_out) else None
    head = _module_name(model, head_mod)
    embeddings = tuple(
        n
        for n, m in model.named_modules()
        if outside(n) and isinstance(m, nn.Embedding) and m.embedding_dim == hidden
    )
    norms = [n for n, m in model.named_modules() if outside(n) and is_norm_module(m)]
    problems: list[str] = []
    extra = [
        n for n, m in model.named_modules() if outside(n) and isinstance(m, nn.Linear) and n != head
    ]
    if extra:
        problems.append(
            f"{extra[0]} ({type(model.get_submodule(extra[0])).__name__}) is a weight outside "
            "the blocks besides the head: a rotation of the residual stream cannot be fused "
            "into it"
        )
    if len(norms) != 1:
        problems.append(
            f"found {len(norms)} norms outside the blocks ({', '.join(norms) or 'none'}); "
            "rotation needs exactly one final norm"
        )
    if head is None:
        problems.append("the model has no output embeddings (LM head)")
    final = norms[-1] if norms else None
    style: NormStyle = "rms"
    if final is not None:
        try:
            style = norm_style(model.get_submodule(final), final)
        except ValueError as exc:
            problems.append(str(exc))
    tied = (
        head_mod is not None
        and token is not None
        and getattr(head_mod, "weight", None) is getattr(token, "weight", None)
    )
    return Outer(embeddings, final, style, head, tied, tuple(problems))


def _hidden_size(model: nn.Module) -> int:
    get_in = getattr(model, "get_input_embeddings", None)
    token = get_in() if callable(get_in) else None
    if isinstance(token, nn.Embedding):
        return int(token.embedding_dim)
    config = getattr(model, "config", None)
    return int(getattr(config, "hidden_size", 0) or 0)


def model_structure(model: nn.Module, cap: Capture) -> ModelStructure:
    """The structural model of ``model`` from ``cap`` (its block-wise capture).

    The representative blocks must hold real weights (norm styles are probed on copies,
    unfused experts are checked against their fused original).

    Raises:
        PtqInputError: Unfused experts do not match the module they replaced.
    """
    hidden = _hidden_size(model)
    if cap.block_path is None:
        return ModelStructure(outer=outer_part(model, None, hidden), hidden_size=hidden)
    kinds = {i: rep for rep, members in cap.block_groups.items() for i in members}
    blocks: dict[int, BlockStructure] = {}
    for cg in cap.graphs:
        rep = int(cg.prefix.rsplit(".", 1)[1])
        for name, m in cg.root.named_modules():
            if isinstance(m, ExpertMLPs):
                check_unfused(f"{cg.prefix}.{name}", m)
        blocks[rep] = analyse_block(cg)
    for prefix, why in cap.failures.items():
        rep = int(prefix.rsplit(".", 1)[1])
        blocks[rep] = BlockStructure(
            problems=(f"capture failed, the block's structure is unknown: {'; '.join(why)}",)
        )
    return ModelStructure(
        block_path=cap.block_path,
        kinds=kinds,
        blocks=blocks,
        outer=outer_part(model, cap.block_path, hidden),
        hidden_size=hidden,
    )
