"""Emulated quantized convolutions (``nn.Conv2d``/``nn.Conv1d`` and GPT-2 ``Conv1D``).

A convolution is a matmul over im2col patches: with ``W [O, I/g, kh, kw]`` flattened to
``W2 [O, K]``, ``K = I/g * kh * kw``, each output channel's row is quantized exactly as
a Linear row (groups run along ``K`` in ``(c, kh, kw)`` order). The module keeps the
:class:`~ptq.formats.QTensor` of ``W2`` and runs the float conv with
``dequantize(W2).reshape(W.shape)``. Input activations are fake-quantized per tensor:
a conv's input is a feature map, not a sequence of tokens, so ``granularity='token'``
is treated as per-tensor (one dynamic scale for the whole input).

GPT-2's ``Conv1D`` (``y = x W + b`` with ``W [K, N]``) is a Linear with a transposed
weight; it becomes a :class:`~ptq.qlinear.QuantLinear` on ``W^T``.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from ptq.activation import fake_quantize_activation
from ptq.formats import QTensor, QuantFormat, dequantize, quantize
from ptq.frontend.quantizable import is_hf_conv1d
from ptq.qlinear import QuantLinear
from ptq.scheme import ActivationScheme


def conv_activation(act: ActivationScheme | None) -> ActivationScheme | None:
    """The activation scheme a conv runs: per-token requests become per-tensor."""
    if act is None or act.granularity == "tensor":
        return act
    return replace(act, granularity="tensor")


class QuantConv2d(nn.Module):
    """A conv (1-D or 2-D) whose weight is a dequantized ``QTensor`` of ``[O, K]``.

    Args:
        conv: The float convolution (hyper-parameters are copied from it).
        qweight: The quantized flattened weight ``[O, I/g * prod(kernel)]``.
        activation: Activation scheme (per-tensor; see module docstring) or None.
        input_scale: Calibrated scale for static activation quantization.
    """

    def __init__(
        self,
        conv: nn.Conv1d | nn.Conv2d,
        qweight: QTensor,
        activation: ActivationScheme | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        o = conv.weight.shape[0]
        k = conv.weight[0].numel()
        if tuple(qweight.shape) != (o, k):
            raise ValueError(
                f"QuantConv2d weight must be [{o}, {k}] for a {tuple(conv.weight.shape)} "
                f"conv, got {tuple(qweight.shape)}"
            )
        conv = copy.deepcopy(conv)  # keeps hyper-parameters and any padding subclass
        self.conv = conv
        self.qweight = qweight
        self.activation = conv_activation(activation)
        self.weight_shape = tuple(conv.weight.shape)
        w = dequantize(qweight).reshape(self.weight_shape).to(conv.weight.dtype)
        conv.weight = nn.Parameter(w, requires_grad=False)
        if conv.bias is not None:
            conv.bias.requires_grad_(False)
        self.input_scale: torch.Tensor | None
        self.register_buffer("input_scale", input_scale)

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            x = fake_quantize_activation(x, self.activation, self.input_scale)
        y: torch.Tensor = self.conv(x)
        return y

    def extra_repr(self) -> str:
        fmt = self.qweight.fmt
        act = "none" if self.activation is None else self.activation.element.name
        return f"shape={self.weight_shape}, weight={fmt.element.name}/{fmt.granularity}, act={act}"


def quantize_conv_module(
    module: nn.Module,
    fmt: QuantFormat,
    activation: ActivationScheme | None = None,
    input_scale: torch.Tensor | None = None,
) -> nn.Module:
    """Round-to-nearest quantized replacement for a conv or HF ``Conv1D``.

    Raises:
        ValueError: ``module`` is not ``nn.Conv1d``/``nn.Conv2d``/``Conv1D``.
    """
    if is_hf_conv1d(module):
        weight, maybe_bias = module.weight, module.bias
        assert isinstance(weight, torch.Tensor)
        w = weight.detach().t()
        bias = maybe_bias if isinstance(maybe_bias, torch.Tensor) else None
        return QuantLinear(quantize(w.contiguous(), fmt), bias, activation, input_scale)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        w2 = module.weight.detach().reshape(module.weight.shape[0], -1)
        return QuantConv2d(module, quantize(w2, fmt), activation, input_scale)
    raise ValueError(
        f"quantize_conv_module takes nn.Conv1d, nn.Conv2d or transformers Conv1D, "
        f"not {type(module).__name__}"
    )
