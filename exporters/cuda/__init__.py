"""CUDA kernels serving ptq's packed formats, as ``torch.ops.ptq.qlinear_*`` custom ops.

Importing this package declares the ops (CPU reference everywhere, CUDA kernels on GPUs);
the kernels are compiled only on the first CUDA call. See LAYOUT.md for the layouts.
"""

from ptq.exporters.cuda.linear import QLinear, qlinear
from ptq.exporters.cuda.ops import (
    qlinear_bitstream,
    qlinear_fp8_w8a8,
    qlinear_int4,
    qlinear_mxfp4,
    qlinear_nvfp4,
    qlinear_per_channel,
    qlinear_w4a8,
)
from ptq.exporters.cuda.packing import PackedWeight, pack_qtensor
from ptq.exporters.cuda.reference import quantize_fp8_per_token

__all__ = [
    "PackedWeight",
    "QLinear",
    "pack_qtensor",
    "qlinear",
    "qlinear_bitstream",
    "qlinear_fp8_w8a8",
    "qlinear_int4",
    "qlinear_mxfp4",
    "qlinear_nvfp4",
    "qlinear_per_channel",
    "qlinear_w4a8",
    "quantize_fp8_per_token",
]
