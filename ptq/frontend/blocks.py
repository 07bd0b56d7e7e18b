"""The one block finder: where a model's repeated blocks are.

Every part of ptq that walks a model block by block (the weight source, the runner,
capture, the structural model) asks :func:`find_blocks`. Known paths
(``model.layers``, ``transformer.h``, ``model.decoder.layers`` ...) holding blocks of
one class are tried first, then any ``ModuleList`` of two or more blocks of one class
that holds at least half of the model's parameters and falls into few structural groups
(one group, or at most a quarter as many groups as blocks, e.g. hybrid attention
models); CNN stages whose blocks mostly differ are not blocks (the model is one unit).
"""

from __future__ import annotations

from typing import Any

from torch import nn

KNOWN_BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.blocks",
    "encoder.layer",
    "bert.encoder.layer",
    "layers",
    "h",
)


def block_signature(block: nn.Module) -> tuple[Any, ...]:
    """Structure of a block: module types and parameter shapes by relative name."""
    mods = tuple((n, type(m).__qualname__) for n, m in block.named_modules())
    params = tuple((n, tuple(p.shape)) for n, p in block.named_parameters())
    return (mods, params)


def _repeated(mlist: nn.Module, least: int, few_groups: bool) -> bool:
    if not isinstance(mlist, nn.ModuleList) or len(mlist) < least:
        return False
    if len({type(b) for b in mlist}) != 1:
        return False
    if not few_groups:
        return True
    n_groups = len({block_signature(b) for b in mlist})
    return n_groups == 1 or 4 * n_groups <= len(mlist)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The dotted path and ``ModuleList`` of the model's repeated blocks, or None.

    Works on a weightless (``meta``) skeleton: only shapes and classes are read.
    """
    for path in KNOWN_BLOCK_PATHS:
        try:
            mlist = model.get_submodule(path)
        except AttributeError:
            continue
        if _repeated(mlist, 1, few_groups=False):
            assert isinstance(mlist, nn.ModuleList)
            return path, mlist
    total = sum(p.numel() for p in model.parameters()) or 1
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and _repeated(mod, 2, few_groups=True):
            size = sum(p.numel() for p in mod.parameters())
            if 2 * size >= total and (best is None or size > best[0]):
                best = (size, name, mod)
    return None if best is None else (best[1], best[2])


def block_groups(blocks: nn.ModuleList) -> dict[int, list[int]]:
    """Representative block index -> every block index with its structure."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, block in enumerate(blocks):
        groups.setdefault(block_signature(block), []).append(i)
    return {members[0]: members for members in groups.values()}
