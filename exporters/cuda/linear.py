"""One entry point for a quantized Linear: route a :class:`PackedWeight` to its op.

``qlinear`` calls the same ``torch.ops.ptq`` op on every device (CPU reference, CUDA
kernels on GPUs); :class:`QLinear` wraps it as an ``nn.Module`` holding the packed tensors
as buffers, optionally quantizing activations to FP8 per token (W4A8 / W8A8).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ptq.exporters.cuda import ops as _ops  # noqa: F401  (declares torch.ops.ptq.*)
from ptq.exporters.cuda.packing import PackedWeight
from ptq.exporters.cuda.reference import BITSTREAM_ELEMENTS, quantize_fp8_per_token

W4A8_WEIGHTS = ("int4", "nvfp4", "mxfp4")
FP8_ACT_WEIGHTS = (*W4A8_WEIGHTS, "fp8")


def qlinear(
    x: Tensor, packed: PackedWeight, bias: Tensor | None = None, fp8_act: bool = False
) -> Tensor:
    """``y = x @ W^T + b`` with ``W`` decoded from ``packed``.

    Args:
        x: Activations ``[..., K]`` (fp32/fp16/bf16).
        packed: Packed weight (:func:`ptq.exporters.cuda.pack_qtensor`).
        bias: Optional ``[N]``.
        fp8_act: Quantize ``x`` dynamically per token to FP8 E4M3 (W4A8 for 4-bit
            weights, W8A8 for FP8 weights); the output keeps ``x.dtype``.
    """
    p, ops = packed, torch.ops.ptq
    if fp8_act:
        x_q, x_scale = quantize_fp8_per_token(x)
        if p.format in W4A8_WEIGHTS:
            return ops.qlinear_w4a8(
                x_q,
                x_scale,
                p.weight,
                p.weight_scale,
                p.weight_zero_point,
                p.weight_global_scale,
                p.format,
                p.group_size,
                x.dtype,
                bias,
            )
        if p.format == "fp8":
            return ops.qlinear_fp8_w8a8(x_q, x_scale, p.weight, p.weight_scale, x.dtype, bias)
        raise ValueError(f"FP8 activations need int4/nvfp4/mxfp4/fp8 weights, got {p.format!r}")
    if p.format == "int4":
        return ops.qlinear_int4(
            x, p.weight, p.weight_scale, p.weight_zero_point, p.group_size, bias
        )
    if p.format == "nvfp4":
        if p.weight_global_scale is None:
            raise ValueError("nvfp4 PackedWeight has no weight_global_scale")
        return ops.qlinear_nvfp4(x, p.weight, p.weight_scale, p.weight_global_scale, bias)
    if p.format == "mxfp4":
        return ops.qlinear_mxfp4(x, p.weight, p.weight_scale, bias)
    if p.format in ("int8", "fp8"):
        return ops.qlinear_per_channel(x, p.weight, p.weight_scale, bias)
    if p.format in BITSTREAM_ELEMENTS:
        return ops.qlinear_bitstream(
            x, p.weight, p.weight_scale, p.weight_zero_point, p.format, p.group_size, bias
        )
    raise ValueError(f"unknown packed format {p.format!r}")


class QLinear(nn.Module):
    """A Linear layer that runs on packed quantized weights through ``torch.ops.ptq``."""

    def __init__(self, packed: PackedWeight, bias: Tensor | None = None, fp8_act: bool = False):
        super().__init__()
        self.format = packed.format
        self.group_size = packed.group_size
        self.fp8_act = fp8_act
        self.weight: torch.Tensor
        self.weight_scale: torch.Tensor
        self.weight_zero_point: torch.Tensor | None
        self.weight_global_scale: torch.Tensor | None
        self.register_buffer("weight", packed.weight)
        self.register_buffer("weight_scale", packed.weight_scale)
        self.register_buffer("weight_zero_point", packed.weight_zero_point)
        self.register_buffer("weight_global_scale", packed.weight_global_scale)
        self.register_buffer("bias", bias)

    def packed(self) -> PackedWeight:
        """The buffers (moved with the module) as a :class:`PackedWeight`."""
        return PackedWeight(
            self.format,
            self.weight,
            self.weight_scale,
            self.group_size,
            self.weight_zero_point,
            self.weight_global_scale,
        )

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias if isinstance(self.bias, Tensor) else None
        return qlinear(x, self.packed(), bias, self.fp8_act)
