"""The emulated quantized Linear: exactly the numerics of the exported artifact.

``y = fq_act(x) @ dequantize(W_q)^T + b``, with ``W_q`` the :class:`~ptq.formats.QTensor`
the exporters write and ``fq_act`` the activation fake-quantizer the runtime applies.
"""

from __future__ import annotations

import torch
from torch import nn

from ptq.activation import fake_quantize_activation
from ptq.formats import QTensor, dequantize
from ptq.scheme import ActivationScheme


class QuantLinear(nn.Module):
    """A Linear whose weight is the dequantized ``QTensor`` and whose input is fake-quantized.

    Args:
        qweight: The quantized weight ``[out, in]``.
        bias: Optional bias (kept in floating point).
        activation: Activation scheme, or None for weight-only.
        input_scale: Calibrated scale for static activation quantization.
    """

    def __init__(
        self,
        qweight: QTensor,
        bias: torch.Tensor | None,
        activation: ActivationScheme | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.qweight = qweight
        self.activation = activation
        self.weight = nn.Parameter(dequantize(qweight), requires_grad=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self.register_buffer("input_scale", input_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            x = fake_quantize_activation(x, self.activation, self.input_scale)
        return nn.functional.linear(
            x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )

    def extra_repr(self) -> str:
        fmt = self.qweight.fmt
        act = "none" if self.activation is None else self.activation.element.name
        return (
            f"in={self.in_features}, out={self.out_features}, weight={fmt.element.name}/"
            f"{fmt.granularity}, act={act}"
        )
