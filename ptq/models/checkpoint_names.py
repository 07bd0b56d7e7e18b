"""Tensor names in a checkpoint against names in the module tree.

transformers 5 renames some checkpoint keys when it loads a model (Mixtral's
``block_sparse_moe`` is the module ``mlp``) and fuses per-expert weights (undone by
:func:`ptq.frontend.experts.unfuse_experts`, after which every expert weight is again
one tensor). ptq reads a checkpoint under the module tree's names and writes its output
under the checkpoint's own names, which vLLM and transformers both load:
:class:`CheckpointNames` applies transformers' renamings (its conversion mapping for the
model) forward (checkpoint -> module tree) and in reverse. For most models there are
none and both directions are the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torch import nn

Rename = Callable[[str], str]


def _identity(name: str) -> str:
    return name


def _renamers(model: nn.Module) -> tuple[Rename, Rename]:
    """(checkpoint -> module tree, module tree -> checkpoint) from transformers' mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings
    except ImportError:
        return _identity, _identity
    try:
        loading = get_model_conversion_mapping(model, add_legacy=True)  # type: ignore[arg-type]
        saving = get_model_conversion_mapping(model, add_legacy=False)  # type: ignore[arg-type]
    except Exception:  # not a transformers model
        return _identity, _identity

    def renamings(items: Iterable[object]) -> list[WeightRenaming]:
        return [
            c for c in items if isinstance(c, WeightRenaming) and not isinstance(c, PrefixChange)
        ]

    forward = renamings(loading)
    reverse = renamings(c.reverse_transform() for c in renamings(saving)[::-1])
    if not forward and not reverse:
        return _identity, _identity

    def to_memory(name: str) -> str:
        return str(apply_renamings(name, forward))

    def to_disk(name: str) -> str:
        return str(apply_renamings(name, reverse))

    return to_memory, to_disk


class CheckpointNames:
    """Both directions of a model's checkpoint renamings.

    Module names are mapped through a representative tensor name (``name + ".weight"``)
    so that renamings written for tensor keys (``.block_sparse_moe.``) apply to them too.
    """

    def __init__(self, to_memory: Rename = _identity, to_disk: Rename = _identity) -> None:
        self._to_memory = to_memory
        self._to_disk = to_disk

    @classmethod
    def of(cls, model: nn.Module) -> CheckpointNames:
        return cls(*_renamers(model))

    @property
    def identity(self) -> bool:
        return self._to_memory is _identity and self._to_disk is _identity

    def to_memory(self, name: str) -> str:
        """A checkpoint tensor name as the module tree names it."""
        return self._to_memory(name)

    def to_disk(self, name: str) -> str:
        """A module-tree tensor name as the checkpoint (and the output) names it."""
        return self._to_disk(name)

    def module_to_disk(self, module: str) -> str:
        """A module name (``model.layers.0.mlp.experts.3.w1``) in checkpoint naming."""
        return self._to_disk(module + ".weight").removesuffix(".weight")

    def module_to_memory(self, module: str) -> str:
        """A checkpoint module name in module-tree naming."""
        return self._to_memory(module + ".weight").removesuffix(".weight")
