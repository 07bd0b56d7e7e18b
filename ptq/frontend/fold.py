"""Fold batch-norm into the preceding convolution (inference only).

In eval mode ``BN(z) = gamma * (z - mu) / sqrt(var + eps) + beta`` is affine per output
channel, so for ``z = W * x + b``

    W' = W * a[:, None, None, None],    b' = (b - mu) * a + beta,    a = gamma / sqrt(var + eps)

(Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", 2018, section 3.2). Quantizing ``W'`` instead of
``W`` is what an integer runtime executes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ptq.frontend.capture import Capture, capture
from ptq.frontend.graph_utils import CONV_OPS, op_name, trace_param
from ptq.frontend.structure_graph import weight_owner
from ptq.modules import replace_module


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` (same class and padding behaviour) with ``bn`` folded in.

    Raises:
        ValueError: Channel counts differ or ``bn`` has no running statistics.
    """
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"cannot fold {type(bn).__name__}({bn.num_features}) into a conv with "
            f"{conv.out_channels} output channels"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a batch-norm without running statistics")
    with torch.no_grad():
        w = conv.weight.detach().double()
        a = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            a = a * bn.weight.detach().double()
        b = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(a)
        beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(a)
        new_b = (b - bn.running_mean.double()) * a + beta
        folded = copy.deepcopy(conv)
        dtype = conv.weight.dtype
        folded.weight = nn.Parameter((w * a.view(-1, 1, 1, 1)).to(dtype), requires_grad=False)
        folded.bias = nn.Parameter(new_b.to(dtype), requires_grad=False)
    return folded


def conv_bn_pairs(cap: Capture) -> list[tuple[str, str]]:
    """``(conv, batch_norm)`` module names of every conv whose only consumer is a
    batch-norm, on the captured graphs (whole-model or per block)."""
    pairs: list[tuple[str, str]] = []
    for cg in cap.graphs:
        gm = cg.graph_module
        prefix = f"{cg.prefix}." if cg.prefix else ""
        for node in gm.graph.nodes:
            owner = weight_owner(node, cg)
            if owner is None or op_name(node, gm) not in CONV_OPS | {"Conv2d"}:
                continue
            if len(node.users) != 1:
                continue
            bn = next(iter(node.users))
            if bn.op == "call_module" and isinstance(
                gm.get_submodule(str(bn.target)), nn.BatchNorm2d
            ):
                pairs.append((prefix + owner, prefix + str(bn.target)))
            elif "batch_norm" in op_name(bn, gm) and len(bn.args) > 1 and bn.args[0] is node:
                use = trace_param(bn.args[1], cg.params)
                if use is not None:
                    pairs.append((prefix + owner, prefix + use.param.rpartition(".")[0]))
    return pairs


def fold_all_conv_bn(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
    *,
    captured: Capture | None = None,
) -> list[tuple[str, str]]:
    """Fold every conv -> batch-norm pair found on the graph, in place.

    The conv becomes its folded copy and the batch-norm an ``nn.Identity``. Only pairs
    where the batch-norm is the conv's sole consumer are folded (from the graph).

    Returns:
        The ``(conv, bn)`` module names folded.

    Raises:
        ValueError: ``model`` is in training mode (batch statistics, nothing to fold).
    """
    if model.training:
        raise ValueError("fold_all_conv_bn needs model.eval(): training-mode BN uses batch stats")
    cap = captured if captured is not None else capture(model, example_inputs, block_wise=False)
    done: list[tuple[str, str]] = []
    for conv_name, bn_name in conv_bn_pairs(cap):
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            continue
        replace_module(model, conv_name, fold_conv_bn(conv, bn))
        replace_module(model, bn_name, nn.Identity())
        done.append((conv_name, bn_name))
    return done
