"""Rebuild the emulated quantized model of an output of a model built by code (a CNN).

``config.json``'s ``ptq_module`` (:mod:`ptq.module_quantize`) names the model (a built-in
or a factory, :mod:`ptq.models.module_source`) and the conv -> batch-norm pairs that were
folded. The module tree is built again, each recorded pair folded structurally (the conv
given a bias, the batch-norm an identity: :func:`ptq.frontend.fold.fold_conv_bn`), every
planned layer replaced by its emulated twin decoded from the packed tensors
(:func:`ptq.models.quantized_loader.layer_parts`: a conv becomes a
:class:`~ptq.frontend.qconv.QuantConv2d`, a Linear a :class:`~ptq.qlinear.QuantLinear`),
and every other tensor loaded as stored. The result computes exactly what the in-memory
quantized model computed: the same dequantized weights, biases and activation scales.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ptq.errors import PtqInputError
from ptq.frontend.fold import fold_conv_bn
from ptq.frontend.qconv import QuantConv2d
from ptq.io.safetensors_reader import SafetensorsIndex
from ptq.models.module_source import ModuleSource
from ptq.modules import replace_module
from ptq.qlinear import QuantLinear

__all__ = ["LoadedModule", "load_quantized_module"]


@dataclass
class LoadedModule:
    """A rebuilt output: the emulated model, its source and what the output recorded."""

    model: nn.Module
    source: ModuleSource
    record: dict[str, Any]


def load_quantized_module(path: Path, *, trust_remote_code: bool = False) -> LoadedModule:
    """Rebuild the quantized model of output ``path`` (see the module docstring).

    Raises:
        PtqInputError: Not an output of a model built by code, or its tensors do not fit
            the rebuilt module tree.
        PtqUsageError: A factory's output without ``trust_remote_code``.
    """
    from ptq.models.quantized_loader import layer_parts, read_output
    from ptq.module_quantize import MODULE_KEY

    config, plan = read_output(path)
    record = config.get(MODULE_KEY)
    if not isinstance(record, dict):
        raise PtqInputError(f"{path} is not the output of a model built by code (no {MODULE_KEY})")
    try:
        source = ModuleSource.from_dict(record)
        folded = [(str(c), str(b)) for c, b in record.get("folded", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise PtqInputError(f"{path / 'config.json'}: unreadable {MODULE_KEY} ({exc})") from None
    model = source.build(trust_remote_code=trust_remote_code)
    for conv_name, bn_name in folded:
        try:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        except AttributeError as exc:
            raise PtqInputError(f"{path}: folded pair not in the rebuilt model ({exc})") from None
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise PtqInputError(f"{path}: {conv_name} <- {bn_name} is not a conv and batch-norm")
        replace_module(model, conv_name, fold_conv_bn(conv, bn))
        replace_module(model, bn_name, nn.Identity())
    index = SafetensorsIndex(path)
    for lp in plan:
        parts = layer_parts(index, lp, path)
        try:
            layer = model.get_submodule(lp.name)
        except AttributeError:
            raise PtqInputError(f"{path}: planned layer {lp.name} is not in the model") from None
        new: nn.Module
        if isinstance(layer, nn.Conv1d | nn.Conv2d):
            conv = copy.deepcopy(layer)
            conv.bias = None if parts.bias is None else nn.Parameter(parts.bias, False)
            new = QuantConv2d(conv, parts.qweight, lp.activation, parts.input_scale)
        elif isinstance(layer, nn.Linear):
            new = QuantLinear(
                parts.qweight, parts.bias, lp.activation, parts.input_scale, parts.lorc
            )
        else:
            raise PtqInputError(f"{path}: planned layer {lp.name} is a {type(layer).__name__}")
        replace_module(model, lp.name, new)
    quantized = tuple(f"{n}." for n in plan.layers)
    state = {k: index.get(k) for k in index if not k.startswith(quantized)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(quantized)]
    if missing or unexpected:
        raise PtqInputError(
            f"{path}: weights do not match the rebuilt {source.spec} (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    return LoadedModule(model.eval(), source, record)
