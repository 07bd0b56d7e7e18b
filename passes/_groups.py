"""What the structural passes (SmoothQuant, rotation, KV cache) read from the structure.

Smoothing and rotation need to know which weights read the output of which module
(``input_layernorm -> {q,k,v}_proj``, ``v_proj -> o_proj``, ``up_proj -> down_proj``,
a MoE block's norm -> router + every expert): a per-channel scale ``s`` on the readers'
input can be folded into the producer (the norm's weight, or the producer's rows)
because each reader input channel is a copy of one producer output channel. These
:class:`LinearGroup` come from the captured graph (:mod:`ptq.frontend.structure`),
carried on the plan; :func:`structure_of` gives it to a pass (capturing an in-memory
model when a plan was made without one).

:func:`weight_view` is every weight as ``[out, in]`` (GPT-2's ``Conv1D`` stores
``[in, out]``; the view writes through to it), so folding code never asks the module type.
"""

from __future__ import annotations

import torch
from torch import nn

from ptq.frontend.quantizable import is_hf_conv1d
from ptq.frontend.structure import BlockStructure, LinearGroup, ModelStructure
from ptq.pipeline import QuantState

__all__ = [
    "LinearGroup",
    "bias_of",
    "block_structure",
    "child",
    "structure_of",
    "tensor_attr",
    "weight_view",
]


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


def weight_view(module: nn.Module) -> torch.Tensor:
    """The module's 2-D weight as an ``[out, in]`` view (writes reach the parameter).

    Raises:
        ValueError: No 2-D ``weight``.
    """
    w = tensor_attr(module, "weight")
    if w.dim() != 2:
        raise ValueError(f"{type(module).__name__}.weight is {w.dim()}-D, not a matrix")
    return w.t() if is_hf_conv1d(module) else w


def bias_of(module: nn.Module) -> torch.Tensor | None:
    """The module's bias, or None."""
    b = getattr(module, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def structure_of(state: QuantState) -> ModelStructure:
    """The run's structural model: the plan's, or captured now from an in-memory model.

    Raises:
        ValueError: The plan has none and the model's weights are not loaded (a lazily
            read model must be planned with :func:`ptq.plan.build_plan` first).
    """
    if state.plan.structure is not None:
        return state.plan.structure
    if any(p.is_meta for p in state.model.parameters()):
        raise ValueError(
            "the plan carries no model structure and the model's weights are not loaded; "
            "build the plan with ptq.plan.build_plan on the loaded blocks"
        )
    from ptq.frontend.analyse import model_structure
    from ptq.frontend.capture import capture
    from ptq.frontend.experts import all_tokens

    with all_tokens(state.model):
        cap = capture(state.model)
    state.plan.structure = model_structure(state.model, cap)
    return state.plan.structure


def block_structure(state: QuantState) -> BlockStructure:
    """The current block unit's structure (full names)."""
    unit = state.unit
    assert unit is not None and unit.kind == "block"
    return structure_of(state).block(unit.index)
