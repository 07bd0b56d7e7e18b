"""Small helpers on ``nn.Module`` trees shared by passes, loaders and exporters."""

from __future__ import annotations

from torch import nn


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` under ``root`` (e.g. ``layers.0.mlp.up_proj``)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
