"""Evaluation precision: run a model in fp32, bf16 or fp16, optionally with LayerCast.

LayerCast (Yuan et al., "Give Me FP32 or Give Me Death? Challenges and Solutions for
Reproducible Reasoning", 2025) stores the weights in a 16-bit dtype but computes in
fp32: every parameter ``P`` (16-bit in memory) is read as ``float32(P)`` at the moment
a module uses it, and the activations are float32 throughout, so every matmul (linear
layers, attention, the head) multiplies and accumulates in fp32. The only 16-bit
rounding left is the one of the stored weights, which does not depend on how the
computation is batched or threaded.

Without LayerCast the model runs entirely in the dtype: parameters are cast, so the
embeddings, activations, matmul outputs and logits are 16-bit (torch's CPU kernels
accumulate a 16-bit matmul in fp32 and round its output to the dtype). Buffers (rotary
frequencies, KV-cache scales) keep their own dtype, as when transformers loads a
checkpoint with ``dtype=bfloat16``.

A ptq output loads with dequantized float32 weights (``QuantLinear.weight``); casting
it stores those dequantized weights in the 16-bit dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ptq.errors import PtqUsageError

__all__ = ["EVAL_DTYPES", "cast_model", "eval_dtype"]

#: The dtypes ``ptq eval --dtype`` accepts, by their command-line names.
EVAL_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def eval_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name.

    Raises:
        PtqUsageError: Not one of ``fp32``, ``bf16``, ``fp16``.
    """
    try:
        return EVAL_DTYPES[name]
    except KeyError:
        raise PtqUsageError(
            f"--dtype {name!r} is not supported; choose one of {', '.join(EVAL_DTYPES)}"
        ) from None


class _UpcastToFloat32(nn.Module):
    """Parametrization ``P -> float32(P)``: the weight is read in fp32, stored as is."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


def cast_model(model: nn.Module, dtype: torch.dtype, *, layercast: bool = False) -> nn.Module:
    """Store ``model``'s parameters in ``dtype`` (in place) and choose how it computes.

    Args:
        model: Any module (an FP transformers model or a loaded ptq output).
        dtype: ``torch.float32``, ``torch.bfloat16`` or ``torch.float16``.
        layercast: Keep the parameters in ``dtype`` but read each one as float32 when it
            is used (a parametrization), so the whole forward pass computes in fp32.
            With ``dtype=float32`` there is nothing to upcast and the model is unchanged.

    Returns:
        ``model`` itself. Tied parameters stay tied (one stored tensor).
    """
    if dtype not in EVAL_DTYPES.values():
        raise PtqUsageError(f"dtype {dtype} is not one of fp32, bf16, fp16")
    for param in model.parameters():
        param.data = param.data.to(dtype)
    if not layercast or dtype == torch.float32:
        return model
    owners = [
        (module, name)
        for module in model.modules()
        for name, _ in module.named_parameters(recurse=False)
    ]
    for module, name in owners:
        # unsafe: the parametrization changes the dtype (16-bit stored, fp32 read)
        parametrize.register_parametrization(module, name, _UpcastToFloat32(), unsafe=True)
    return model
