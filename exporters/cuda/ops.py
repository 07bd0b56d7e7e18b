"""``torch.ops.ptq.qlinear_*``: quantized Linear ops with a CPU reference and CUDA kernels.

Each op computes ``y = x @ W^T + b`` where ``W`` is decoded from a packed
compressed-tensors layout (LAYOUT.md). The default implementation (every device, used on
CPU) is the pure-torch reference in :mod:`ptq.exporters.cuda.reference`: dequantize to
fp32 exactly as :func:`ptq.formats.dequantize` does, then an fp32 matmul. The CUDA
implementation launches the kernels in ``csrc/`` (built lazily on first use) and falls
back to the reference for shapes they do not take. ``qlinear_bitstream`` serves the
ptq-layout bit streams (INT3/5/6, FP6) with a GEMV for at most 8 activation rows (more
rows use the reference on the GPU). W4A8 / W8A8 ops take FP8 E4M3 activations with
per-token scales: ``y = (e4m3(x_q) * x_scale) @ W^T + b`` (ZeroQuant-FP,
Wu et al. 2023). Importing this module only declares the ops; nothing is compiled.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ptq.exporters.cuda import reference as ref
from ptq.exporters.cuda.launch import bitstream_kernel_supports, kernel_supports, run_qlinear

W4A8_FORMATS = ("int4", "nvfp4", "mxfp4")


def _linear(x: Tensor, w: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    y = x.reshape(-1, x.shape[-1]).float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], w.shape[0]).to(out_dtype)


def _run_grouped(
    fmt: str,
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    zp: Tensor | None,
    group: int,
    bias: Tensor | None,
) -> Tensor:
    """Weight-only kernel call for a group-scaled format (``fmt + "_asym"`` with zero points)."""
    wformat = fmt if zp is None else f"{fmt}_asym"
    return run_qlinear(
        wformat, x, packed, x.dtype, group, weight_scale=scale, zero_point=zp, bias=bias
    )


def _register_fake(op: Any, weight_arg: int, out_dtype_arg: int | None = None) -> None:
    """Shape-only implementation (``torch.compile``, meta tensors) of a qlinear op.

    Every op returns ``[*x.shape[:-1], N]`` where ``x`` is argument 0 and ``N`` is the
    first dimension of the packed weight (argument ``weight_arg``), in ``x``'s dtype or in
    the dtype passed as argument ``out_dtype_arg``.
    """

    def fake(*args: Any) -> Tensor:
        x, n = args[0], args[weight_arg].shape[0]
        dtype = x.dtype if out_dtype_arg is None else args[out_dtype_arg]
        return x.new_empty((*x.shape[:-1], n), dtype=dtype)

    op.register_fake(fake)


def _w4a8_weight(
    fmt: str, packed: Tensor, scale: Tensor, zp: Tensor | None, gs: Tensor | None, group: int
) -> Tensor:
    if fmt == "int4":
        return ref.dequantize_int4(packed, scale, zp, group)
    if fmt == "nvfp4":
        if gs is None:
            raise ValueError("nvfp4 weights need weight_global_scale")
        return ref.dequantize_nvfp4(packed, scale, gs)
    if fmt == "mxfp4":
        return ref.dequantize_mxfp4(packed, scale)
    raise ValueError(f"W4A8 weight_format {fmt!r} is not one of {', '.join(W4A8_FORMATS)}")


def _w4a8_reference(
    x_q: Tensor,
    x_scale: Tensor,
    packed: Tensor,
    scale: Tensor,
    zp: Tensor | None,
    gs: Tensor | None,
    fmt: str,
    group: int,
    out_dtype: torch.dtype,
    bias: Tensor | None,
) -> Tensor:
    w = _w4a8_weight(fmt, packed, scale, zp, gs, group)
    return _linear(ref.decode_fp8_activations(x_q, x_scale), w, bias, out_dtype)


@torch.library.custom_op("ptq::qlinear_int4", mutates_args=())
def qlinear_int4(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    """INT4 pack-quantized weight-only linear: ``W = (u - z) * s`` per group of K."""
    w = ref.dequantize_int4(weight_packed, weight_scale, weight_zero_point, group_size)
    return _linear(x, w, bias, x.dtype)


@qlinear_int4.register_kernel("cuda")
def _(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    if not kernel_supports(x, x.shape[-1], group_size, x.dtype):
        w = ref.dequantize_int4(weight_packed, weight_scale, weight_zero_point, group_size)
        return _linear(x, w, bias, x.dtype)
    return _run_grouped("int4", x, weight_packed, weight_scale, weight_zero_point, group_size, bias)


@torch.library.custom_op("ptq::qlinear_nvfp4", mutates_args=())
def qlinear_nvfp4(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_global_scale: Tensor,
    bias: Tensor | None,
) -> Tensor:
    """NVFP4 weight-only linear: ``W = e2m1 * e4m3(t) / g`` (groups of 16)."""
    return _linear(
        x, ref.dequantize_nvfp4(weight_packed, weight_scale, weight_global_scale), bias, x.dtype
    )


@qlinear_nvfp4.register_kernel("cuda")
def _(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_global_scale: Tensor,
    bias: Tensor | None,
) -> Tensor:
    if not kernel_supports(x, x.shape[-1], 16, x.dtype):
        w = ref.dequantize_nvfp4(weight_packed, weight_scale, weight_global_scale)
        return _linear(x, w, bias, x.dtype)
    return run_qlinear(
        "nvfp4",
        x,
        weight_packed,
        x.dtype,
        16,
        weight_scale=weight_scale,
        global_scale=weight_global_scale,
        bias=bias,
    )


@torch.library.custom_op("ptq::qlinear_mxfp4", mutates_args=())
def qlinear_mxfp4(
    x: Tensor, weight_packed: Tensor, weight_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """MXFP4 weight-only linear: ``W = e2m1 * 2^(x - 127)`` (groups of 32)."""
    return _linear(x, ref.dequantize_mxfp4(weight_packed, weight_scale), bias, x.dtype)


@qlinear_mxfp4.register_kernel("cuda")
def _(x: Tensor, weight_packed: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    if not kernel_supports(x, x.shape[-1], 32, x.dtype):
        return _linear(x, ref.dequantize_mxfp4(weight_packed, weight_scale), bias, x.dtype)
    return run_qlinear("mxfp4", x, weight_packed, x.dtype, 32, weight_scale=weight_scale, bias=bias)


@torch.library.custom_op("ptq::qlinear_per_channel", mutates_args=())
def qlinear_per_channel(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None
) -> Tensor:
    """INT8 or FP8 E4M3 per-channel weight-only linear: ``W = q * s[n]``."""
    return _linear(x, ref.dequantize_per_channel(weight, weight_scale), bias, x.dtype)


@qlinear_per_channel.register_kernel("cuda")
def _(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    k = x.shape[-1]
    if not kernel_supports(x, k, 32, x.dtype) or x.dtype == torch.float8_e4m3fn:
        return _linear(x, ref.dequantize_per_channel(weight, weight_scale), bias, x.dtype)
    fmt = "fp8" if weight.dtype == torch.float8_e4m3fn else "int8"
    return run_qlinear(fmt, x, weight, x.dtype, k, row_scale=weight_scale, bias=bias)


@torch.library.custom_op("ptq::qlinear_bitstream", mutates_args=())
def qlinear_bitstream(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    weight_format: str,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    """INT3/5/6 or FP6 bit-stream weight-only linear: ``W = value(u) * s`` per group of K."""
    w = ref.dequantize_bitstream(
        weight_packed, weight_scale, weight_zero_point, weight_format, group_size, x.shape[-1]
    )
    return _linear(x, w, bias, x.dtype)


@qlinear_bitstream.register_kernel("cuda")
def _(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    weight_format: str,
    group_size: int,
    bias: Tensor | None,
) -> Tensor:
    k = x.shape[-1]
    # Shapes and dtypes checked before any launch: the kernel reads without bounds checks.
    ref.check_bitstream(
        weight_packed, weight_scale, weight_zero_point, weight_format, group_size, k
    )
    if not bitstream_kernel_supports(x, k, group_size):
        w = ref.dequantize_bitstream(
            weight_packed, weight_scale, weight_zero_point, weight_format, group_size, k
        )
        return _linear(x, w, bias, x.dtype)
    return _run_grouped(
        weight_format, x, weight_packed, weight_scale, weight_zero_point, group_size, bias
    )


@torch.library.custom_op("ptq::qlinear_w4a8", mutates_args=())
def qlinear_w4a8(
    x_q: Tensor,
    x_scale: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    weight_global_scale: Tensor | None,
    weight_format: str,
    group_size: int,
    out_dtype: torch.dtype,
    bias: Tensor | None,
) -> Tensor:
    """W4A8: INT4/NVFP4/MXFP4 weights times FP8 E4M3 activations with per-token scales."""
    return _w4a8_reference(
        x_q,
        x_scale,
        weight_packed,
        weight_scale,
        weight_zero_point,
        weight_global_scale,
        weight_format,
        group_size,
        out_dtype,
        bias,
    )


@qlinear_w4a8.register_kernel("cuda")
def _(
    x_q: Tensor,
    x_scale: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    weight_global_scale: Tensor | None,
    weight_format: str,
    group_size: int,
    out_dtype: torch.dtype,
    bias: Tensor | None,
) -> Tensor:
    group = {"nvfp4": 16, "mxfp4": 32}.get(weight_format, group_size)
    if (
        not kernel_supports(x_q, x_q.shape[-1], group, out_dtype)
        or x_q.dtype != torch.float8_e4m3fn
    ):
        return _w4a8_reference(
            x_q,
            x_scale,
            weight_packed,
            weight_scale,
            weight_zero_point,
            weight_global_scale,
            weight_format,
            group_size,
            out_dtype,
            bias,
        )
    fmt = (
        "int4_asym" if weight_format == "int4" and weight_zero_point is not None else weight_format
    )
    return run_qlinear(
        fmt,
        x_q,
        weight_packed,
        out_dtype,
        group,
        weight_scale=weight_scale,
        zero_point=weight_zero_point,
        global_scale=weight_global_scale,
        x_scale=x_scale,
        bias=bias,
    )


@torch.library.custom_op("ptq::qlinear_fp8_w8a8", mutates_args=())
def qlinear_fp8_w8a8(
    x_q: Tensor,
    x_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    out_dtype: torch.dtype,
    bias: Tensor | None,
) -> Tensor:
    """FP8 W8A8: ``y = (e4m3(x_q) x_scale[m]) @ (e4m3(W) s[n])^T + b``."""
    w = ref.dequantize_per_channel(weight, weight_scale)
    return _linear(ref.decode_fp8_activations(x_q, x_scale), w, bias, out_dtype)


@qlinear_fp8_w8a8.register_kernel("cuda")
def _(
    x_q: Tensor,
    x_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    out_dtype: torch.dtype,
    bias: Tensor | None,
) -> Tensor:
    k = x_q.shape[-1]
    if not kernel_supports(x_q, k, 32, out_dtype) or weight.dtype != torch.float8_e4m3fn:
        w = ref.dequantize_per_channel(weight, weight_scale)
        return _linear(ref.decode_fp8_activations(x_q, x_scale), w, bias, out_dtype)
    return run_qlinear(
        "fp8", x_q, weight, out_dtype, k, row_scale=weight_scale, x_scale=x_scale, bias=bias
    )


_register_fake(qlinear_int4, weight_arg=1)
_register_fake(qlinear_nvfp4, weight_arg=1)
_register_fake(qlinear_mxfp4, weight_arg=1)
_register_fake(qlinear_per_channel, weight_arg=1)
_register_fake(qlinear_bitstream, weight_arg=1)
_register_fake(qlinear_w4a8, weight_arg=2, out_dtype_arg=8)
_register_fake(qlinear_fp8_w8a8, weight_arg=2, out_dtype_arg=4)
