"""An online Hadamard on a weight's input, kept while the module tree is quantized.

QuaRot's online rotation of the MLP down projection's input: ``x <- x H^T`` at run time
(:func:`~ptq.passes.hadamard.hadamard_transform`) with ``W <- W H^T`` folded offline, so
the product is unchanged while the input's outliers are spread. The weight's parent
module keeps its children and names (the weight passes replace the child in place): its
class becomes a subclass whose ``forward`` applies the transform to the child's input
through a pre-hook that runs before any other (statistics hooks see what the weight sees).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ptq.passes._groups import weight_view
from ptq.passes.hadamard import hadamard_matrix, hadamard_transform

_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _rotate_input(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (hadamard_transform(args[0]), *args[1:])


def online_class(base: type[nn.Module]) -> type[nn.Module]:
    """``base`` with an online Hadamard on the input of child ``online_hadamard_input``."""
    if base not in _CLASSES:

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            target = self.get_submodule(str(self.online_hadamard_input))
            handle = target.register_forward_pre_hook(_rotate_input, prepend=True)
            try:
                return base.forward(self, *args, **kwargs)
            finally:
                handle.remove()

        attrs: dict[str, Any] = {"forward": forward, "online_hadamard": True}
        _CLASSES[base] = type(f"OnlineHadamard{base.__name__}", (base,), attrs)
    return _CLASSES[base]


def has_online_hadamard(module: nn.Module) -> bool:
    """Whether ``module`` applies an online Hadamard to one of its children's input."""
    return bool(getattr(module, "online_hadamard", False))


def add_online_hadamard(model: nn.Module, name: str) -> None:
    """Rotate weight ``name``'s input online: ``W <- W H^T`` now, ``x H^T`` at run time.

    Raises:
        ValueError: The parent already rotates one of its children's input.
    """
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if has_online_hadamard(parent):
        raise ValueError(f"{parent_name} already has an online Hadamard")
    w = weight_view(model.get_submodule(name))
    h = hadamard_matrix(w.shape[1]).to(w.device)
    with torch.no_grad():
        w.copy_((w.double() @ h.T).to(w.dtype))
    parent.__class__ = online_class(type(parent))
    object.__setattr__(parent, "online_hadamard_input", leaf)
