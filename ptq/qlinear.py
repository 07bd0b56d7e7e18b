"""The emulated quantized Linear: exactly the numerics of the exported artifact.

``y = fq_act(x) @ dequantize(W_q)^T + b [+ (x @ V^T) @ U^T]``, with ``W_q`` the
:class:`~ptq.formats.QTensor` the exporters write, ``fq_act`` the activation
fake-quantizer the runtime applies, and optional low-rank compensation factors ``U``
``[out, r]`` and ``V`` ``[r, in]`` (LoRC, ZeroQuant-V2) applied to the unquantized input.
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
        lorc: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.qweight = qweight
        self.activation = activation
        self.weight = nn.Parameter(dequantize(qweight), requires_grad=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self.input_scale: torch.Tensor | None
        self.register_buffer("input_scale", input_scale)
        self.lorc_u: nn.Parameter | None = None
        self.lorc_v: nn.Parameter | None = None
        if lorc is not None:
            self.set_lorc(*lorc)

    def set_lorc(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Attach low-rank factors ``U`` [out, r] and ``V`` [r, in] (already on their grid)."""
        if (
            u.shape[0] != self.out_features
            or v.shape[1] != self.in_features
            or u.shape[1] != v.shape[0]
        ):
            raise ValueError(
                f"LoRC factors {tuple(u.shape)} x {tuple(v.shape)} do not fit a "
                f"{self.out_features}x{self.in_features} layer"
            )
        self.lorc_u = nn.Parameter(u.detach().float().clone(), requires_grad=False)
        self.lorc_v = nn.Parameter(v.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = x
        if self.activation is not None:
            x = fake_quantize_activation(x, self.activation, self.input_scale)
        y = nn.functional.linear(
            x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )
        if self.lorc_u is not None and self.lorc_v is not None:
            low = nn.functional.linear(x_in, self.lorc_v.to(x.dtype))
            y = y + nn.functional.linear(low, self.lorc_u.to(x.dtype))
        return y

    def extra_repr(self) -> str:
        fmt = self.qweight.fmt
        act = "none" if self.activation is None else self.activation.element.name
        return (
            f"in={self.in_features}, out={self.out_features}, weight={fmt.element.name}/"
            f"{fmt.granularity}, act={act}"
        )
