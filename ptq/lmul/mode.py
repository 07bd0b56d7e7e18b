"""Run a model with every linear layer's products replaced by L-Mul.

Inside :class:`LMulModel`'s forward pass a torch function mode routes every
``torch.nn.functional.linear`` call to :func:`ptq.lmul.matmul.lmul_linear`: all
``nn.Linear`` layers (the LM head included) and ptq's ``QuantLinear`` (its main
product and LoRC factors; activation fake quantization runs first, as it would before
any multiplier). Attention's score and value products, norms and activations are
not linear layers and keep exact multiplication, as in the paper's "linear
transformations" setting (Luo & Sun, 2024).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ptq.lmul.matmul import lmul_linear

__all__ = ["LMulModel"]


class _LinearToLMul(TorchFunctionMode):
    """Routes ``F.linear`` to L-Mul; every other function runs unchanged."""

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            return lmul_linear(*args, **kwargs)
        return func(*args, **kwargs)


class LMulModel(nn.Module):
    """Wraps ``model`` so that its forward pass uses L-Mul in every linear layer.

    The wrapped model must hold float16 or bfloat16 parameters (cast it first with
    :func:`ptq.precision.cast_model`); its activations then reach each linear layer in
    that dtype, as L-Mul's operands.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with _LinearToLMul():
            return self.model(*args, **kwargs)
