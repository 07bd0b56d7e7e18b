"""Call the compiled kernels: check tensors, pick dtypes and split-K, pass raw pointers.

Used only by the CUDA implementations registered in :mod:`ptq.exporters.cuda.ops`; the
extension is built on the first call (:func:`ptq.exporters.cuda.build.load_extension`).
"""

from __future__ import annotations

import torch

from ptq.exporters.cuda.build import GEMM_TILE_K, GEMV_MAX_BATCH, gemm_split_k, load_extension

WFORMAT_CODES = {
    "int4": 0,
    "int4_asym": 1,
    "nvfp4": 2,
    "mxfp4": 3,
    "int8": 4,
    "fp8": 5,
    "int3": 6,
    "int3_asym": 7,
    "int5": 8,
    "int5_asym": 9,
    "int6": 10,
    "int6_asym": 11,
    "fp6_e2m3": 12,
    "fp6_e3m2": 13,
}
BITSTREAM_WFORMATS = tuple(f for f, code in WFORMAT_CODES.items() if code >= 6)
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float8_e4m3fn: 2}
_SCALE_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3}
BITSTREAM_MIN_GROUP = 32


def kernel_supports(x: torch.Tensor, k: int, group_size: int, out_dtype: torch.dtype) -> bool:
    """Whether the CUDA kernels take this call (else the ops fall back to the reference).

    Needs a CUDA ``x`` in fp16/bf16/fp8, an fp16/bf16 output, ``K % 32 == 0`` and a
    power-of-two group size >= 8.
    """
    return (
        x.is_cuda
        and x.dtype in DTYPE_CODES
        and out_dtype in (torch.float16, torch.bfloat16)
        and k % GEMM_TILE_K == 0
        and group_size >= 8
        and group_size & (group_size - 1) == 0
        and x.numel() > 0
    )


def bitstream_kernel_supports(x: torch.Tensor, k: int, group_size: int) -> bool:
    """Whether the bit-stream GEMV takes this call: :func:`kernel_supports` with fp16/bf16
    activations, at most 8 activation rows and a group size >= 32 dividing ``K``."""
    return (
        kernel_supports(x, k, group_size, x.dtype)
        and x.dtype != torch.float8_e4m3fn
        and group_size >= BITSTREAM_MIN_GROUP
        and k % group_size == 0
        and x.numel() // k <= GEMV_MAX_BATCH
    )


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else int(t.data_ptr())


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def run_qlinear(
    wformat: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    out_dtype: torch.dtype,
    group_size: int,
    *,
    weight_scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    global_scale: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """``y = x @ W^T (+ bias)`` on the GPU for ``x [..., K]``; returns ``[..., N]``.

    Args:
        wformat: A key of :data:`WFORMAT_CODES`.
        x: Activations (fp16/bf16, or float8_e4m3fn with ``x_scale`` ``[..., 1]``).
        weight: Packed weights (see LAYOUT.md); rows are output channels.
        out_dtype: fp16 or bf16.
        group_size: Elements per group scale along K.
        split_k: Force the GEMM's K splits (None: heuristic).
    """
    if wformat not in WFORMAT_CODES:
        raise ValueError(f"unknown weight format {wformat!r}; valid: {', '.join(WFORMAT_CODES)}")
    ext = load_extension()
    k = x.shape[-1]
    x2 = _aligned(x.reshape(-1, k))
    m, n = x2.shape[0], weight.shape[0]
    device = x2.device
    scale_kind = 0
    if weight_scale is not None and wformat in ("int4", "int4_asym", *BITSTREAM_WFORMATS):
        # fp32 or the output dtype (bit streams also E8M0 codes as uint8); else fp32.
        e8m0 = weight_scale.dtype == torch.uint8 and wformat in BITSTREAM_WFORMATS
        if not e8m0 and weight_scale.dtype not in (torch.float32, out_dtype):
            weight_scale = weight_scale.float()
        scale_kind = _SCALE_KIND[weight_scale.dtype]
    if weight_scale is not None:
        weight_scale = weight_scale.contiguous()
    if row_scale is not None:
        row_scale = row_scale.reshape(-1).float().contiguous()
    if x_scale is not None:
        x_scale = x_scale.reshape(-1).float().contiguous()
    if global_scale is not None:
        global_scale = global_scale.reshape(-1).float().contiguous()
    if zero_point is not None:
        zero_point = zero_point.contiguous()
    if bias is not None:
        bias = bias.to(out_dtype).contiguous()
    weight = _aligned(weight)
    props = torch.cuda.get_device_properties(device)
    splits = split_k if split_k is not None else gemm_split_k(m, n, k, props.multi_processor_count)
    out = torch.empty((m, n), dtype=out_dtype, device=device)
    workspace = torch.zeros((m, n), dtype=torch.float32, device=device) if splits > 1 else None
    with torch.cuda.device(device):
        ext.qlinear(
            WFORMAT_CODES[wformat],
            DTYPE_CODES[x2.dtype],
            DTYPE_CODES[out_dtype],
            scale_kind,
            _ptr(x2),
            _ptr(x_scale),
            _ptr(weight),
            _ptr(weight_scale),
            _ptr(zero_point),
            _ptr(global_scale),
            _ptr(row_scale),
            _ptr(bias),
            _ptr(out),
            _ptr(workspace),
            m,
            n,
            k,
            group_size,
            props.multi_processor_count,
            splits,
            int(torch.cuda.current_stream(device).cuda_stream),
        )
    return out.reshape(*x.shape[:-1], n)
