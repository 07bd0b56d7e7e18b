"""What a model built by code takes: the interface each kind of input implements.

A :class:`~ptq.models.module_source.ModuleSource` carries one :class:`ModelInputs`
(:class:`~ptq.models.image_inputs.ImageInputs`, ``kind: image``;
:class:`~ptq.models.diffusion.DiffusionInputs`, ``kind: diffusion``); the quantize run
asks it for :class:`Calibration` batches, and the output records its :meth:`to_dict`
(``ptq_module.inputs``), read back by :func:`ptq.models.module_source.inputs_from_dict`
on its ``kind``. A new kind of model adds an implementation and a ``kind``, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["Calibration", "ModelInputs"]


@dataclass(frozen=True)
class Calibration:
    """A model's calibration batches (its ``forward`` keyword dicts), the SHA-256 of every
    file they were drawn from (recorded in the output, refused for evaluation), and a
    one-line summary."""

    batches: list[dict[str, torch.Tensor]]
    sha256: list[str]
    summary: str


class ModelInputs(Protocol):
    """The inputs of a model built by code (see the module docstring)."""

    @property
    def kind(self) -> str:
        """The ``kind`` recorded in the output (``image``)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with ``kind``."""
        ...

    def bound_to(self, model: nn.Module) -> ModelInputs:
        """These inputs with anything read from ``model`` filled in (argument names)."""
        ...

    def calibration(self, folder: Path | None, samples: int, seed: int) -> Calibration:
        """``samples`` calibration samples drawn from ``folder`` (None: the default data)."""
        ...
