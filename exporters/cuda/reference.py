"""Pure-torch unpacking and dequantization of the packed layouts the CUDA kernels read.

These are the CPU reference implementations behind the ``torch.ops.ptq.qlinear_*`` ops
(and their fallback on GPUs for shapes the kernels do not take). They decode exactly as
the emulation in :mod:`ptq.formats` does: element codes through
:func:`ptq.formats.minifloat.decode_float`, then ``W = values * scale`` with scales
broadcast over their group (compressed-tensors layouts, docs/layouts.md):

* INT4 pack-quantized: ``W = (u - z) * s``, ``u`` nibble ``i % 8`` of int32 word ``i / 8``
  (low nibble first), ``z = 8`` (symmetric) or the zero point packed along N.
* NVFP4: ``W = e2m1(code) * (e4m3(t) / g)`` with the fp32 global scale ``g``.
* MXFP4: ``W = e2m1(code) * 2^(x - 127)``.
* INT8 / FP8 per channel: ``W = q * s[n]``.
* ptq-layout bit streams (INT3/5/6, FP6 E2M3/E3M2): codes ``u`` of ``b`` bits back to
  back per row (:func:`ptq.formats.packing.unpack_bits`); ``W = (u - 2^(b-1) - z) * s``
  for integers (``z`` = 0 or the int8 zero point of the group), ``W = fp6(u) * s`` for
  FP6, with group scales ``s`` in fp32/fp16/bf16 or as E8M0 codes (uint8).
"""

from __future__ import annotations

import torch

from ptq.formats import (
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    INT3,
    INT5,
    INT6,
    ElementFormat,
    IntFormat,
)
from ptq.formats.minifloat import decode_float
from ptq.formats.packing import unpack_bits

NVFP4_GROUP = 16
MXFP4_GROUP = 32
BITSTREAM_ELEMENTS: dict[str, ElementFormat] = {
    "int3": INT3,
    "int5": INT5,
    "int6": INT6,
    "fp6_e2m3": FP6_E2M3,
    "fp6_e3m2": FP6_E3M2,
}


def _nibbles(words: torch.Tensor, count: int) -> torch.Tensor:
    """Split each integer of ``words`` into ``count`` 4-bit fields, low field first."""
    shifts = torch.arange(count, device=words.device, dtype=torch.int64) * 4
    return (words.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF


def unpack_int4(weight_packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[N, K/8]`` to the stored unsigned nibbles ``u`` as int64 ``[N, K]``."""
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise ValueError(
            f"weight_packed must be a 2-D int32 tensor, got {weight_packed.dtype} "
            f"{tuple(weight_packed.shape)}"
        )
    n, words = weight_packed.shape
    return _nibbles(weight_packed, 8).reshape(n, words * 8)


def unpack_zero_points(zero_point: torch.Tensor, rows: int) -> torch.Tensor:
    """int32 ``[ceil(N/8), G]`` packed along N to unsigned zero points ``[N, G]``."""
    if zero_point.dtype != torch.int32 or zero_point.dim() != 2:
        raise ValueError(f"weight_zero_point must be 2-D int32, got {zero_point.dtype}")
    groups = zero_point.shape[1]
    z = _nibbles(zero_point, 8)  # [N/8, G, 8]
    return z.permute(0, 2, 1).reshape(-1, groups)[:rows]


def _expand(scale: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    if scale.shape[1] * group != cols:
        raise ValueError(
            f"weight_scale has {scale.shape[1]} groups of {group} but K = {cols}; "
            "the scale shape must be [N, K / group_size]"
        )
    return scale.float().repeat_interleave(group, dim=1)


def dequantize_int4(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """``W = (u - z) * s`` in fp32 ``[N, K]`` from the pack-quantized tensors."""
    u = unpack_int4(weight_packed)
    rows, cols = u.shape
    if weight_zero_point is None:
        values = (u - 8).float()
    else:
        z = unpack_zero_points(weight_zero_point, rows)
        values = (u - z.repeat_interleave(group_size, dim=1)).float()
    return values * _expand(weight_scale, group_size, cols)


def unpack_fp4(weight_packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/2]`` (low nibble = even k) to E2M1 codes uint8 ``[N, K]``."""
    if weight_packed.dtype != torch.uint8 or weight_packed.dim() != 2:
        raise ValueError(f"FP4 weight_packed must be 2-D uint8, got {weight_packed.dtype}")
    lo = weight_packed & 0xF
    hi = weight_packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(weight_packed.shape[0], -1)


def dequantize_nvfp4(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_global_scale: torch.Tensor
) -> torch.Tensor:
    """``W = e2m1 * (e4m3(t) / g)`` in fp32 from nvfp4-pack-quantized tensors."""
    if weight_scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"NVFP4 weight_scale must be float8_e4m3fn, got {weight_scale.dtype}")
    values = decode_float(unpack_fp4(weight_packed), FP4_E2M1)
    t = decode_float(weight_scale.view(torch.uint8), FP8_E4M3)
    scale = t / weight_global_scale.float().reshape(1, 1)
    return values * _expand(scale, NVFP4_GROUP, values.shape[1])


def decode_e8m0(codes: torch.Tensor) -> torch.Tensor:
    """E8M0 codes (uint8) to fp32 ``2^(x - 127)``; 0xFF decodes to NaN."""
    x = codes.to(torch.int32)
    value = torch.ldexp(torch.ones_like(x, dtype=torch.float32), x - 127)
    return torch.where(x == 255, torch.full_like(value, float("nan")), value)


def dequantize_mxfp4(weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``W = e2m1 * 2^(x - 127)`` in fp32 from mxfp4-pack-quantized tensors."""
    if weight_scale.dtype != torch.uint8:
        raise ValueError(f"MXFP4 weight_scale must be uint8 E8M0, got {weight_scale.dtype}")
    values = decode_float(unpack_fp4(weight_packed), FP4_E2M1)
    return values * _expand(decode_e8m0(weight_scale), MXFP4_GROUP, values.shape[1])


def _expand_groups(t: torch.Tensor, group: int, cols: int) -> torch.Tensor:
    """Per-group values ``[N, ceil(K/g)]`` repeated over their group to ``[N, K]``."""
    return t.repeat_interleave(group, dim=1)[:, :cols]


def check_bitstream(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    weight_format: str,
    group_size: int,
    k: int,
) -> ElementFormat:
    """The element format of bit-stream tensors after checking every dtype and shape.

    Raises:
        ValueError: Unknown format, or a tensor of the wrong dtype or shape (named).
    """
    if weight_format not in BITSTREAM_ELEMENTS:
        raise ValueError(
            f"unknown bit-stream format {weight_format!r}; valid: {', '.join(BITSTREAM_ELEMENTS)}"
        )
    el = BITSTREAM_ELEMENTS[weight_format]
    if weight_packed.dtype != torch.uint8 or weight_packed.dim() != 2:
        raise ValueError(f"bit-stream weight_packed must be 2-D uint8, got {weight_packed.dtype}")
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    rows, groups = weight_packed.shape[0], -(-k // group_size)
    if weight_packed.shape[1] != -(-k * el.bits // 8):
        raise ValueError(
            f"{weight_format} weight_packed has {weight_packed.shape[1]} bytes per row; "
            f"K = {k} needs ceil(K * {el.bits} / 8) = {-(-k * el.bits // 8)}"
        )
    if weight_scale.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
        raise ValueError(
            f"weight_scale must be fp32/fp16/bf16 or uint8 E8M0, not {weight_scale.dtype}"
        )
    for name, t in (("weight_scale", weight_scale), ("weight_zero_point", weight_zero_point)):
        if t is not None and tuple(t.shape) != (rows, groups):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; K = {k} in groups of {group_size} over "
                f"{rows} rows needs [{rows}, {groups}]"
            )
    if weight_zero_point is not None and (
        not isinstance(el, IntFormat) or weight_zero_point.dtype != torch.int8
    ):
        raise ValueError(f"{weight_format} zero points must be int8 and integer formats only")
    return el


def dequantize_bitstream(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    weight_format: str,
    group_size: int,
    k: int,
) -> torch.Tensor:
    """``W [N, K]`` in fp32 from ptq-layout bit-stream tensors (see the module docstring).

    Args:
        weight_packed: uint8 ``[N, ceil(K*b/8)]``, each row a little-endian bit stream.
        weight_scale: Group scales ``[N, ceil(K/g)]``: fp32/fp16/bf16 values, or uint8
            E8M0 codes ``2^(x - 127)``.
        weight_zero_point: Integers only: int8 zero points ``[N, ceil(K/g)]`` or None.
        weight_format: A key of :data:`BITSTREAM_ELEMENTS`.
        group_size: Elements per group along K.
        k: ``K`` (the packed width alone does not fix it).
    """
    el = check_bitstream(
        weight_packed, weight_scale, weight_zero_point, weight_format, group_size, k
    )
    u = unpack_bits(weight_packed, el.bits, k)
    if isinstance(el, IntFormat):
        values = u.float() - 2 ** (el.bits - 1)
        if weight_zero_point is not None:
            values = values - _expand_groups(weight_zero_point.float(), group_size, k)
    else:
        values = decode_float(u, el)
    scale = decode_e8m0(weight_scale) if weight_scale.dtype == torch.uint8 else weight_scale.float()
    return values * _expand_groups(scale, group_size, k)


def dequantize_per_channel(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``W = q * s[n]`` for int8 or float8_e4m3fn weights with scales ``[N, 1]``."""
    if weight.dtype == torch.float8_e4m3fn:
        values = decode_float(weight.view(torch.uint8), FP8_E4M3)
    elif weight.dtype == torch.int8:
        values = weight.float()
    else:
        raise ValueError(f"per-channel weight must be int8 or float8_e4m3fn, got {weight.dtype}")
    if weight_scale.numel() != weight.shape[0]:
        raise ValueError(
            f"weight_scale must hold one scale per output channel ({weight.shape[0]}), "
            f"got shape {tuple(weight_scale.shape)}"
        )
    return values * weight_scale.float().reshape(-1, 1)


def decode_fp8_activations(x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    """``x = e4m3(x_q) * x_scale[m]`` in fp32 (per-token scales ``[M, 1]``)."""
    if x_q.dtype != torch.float8_e4m3fn:
        raise ValueError(f"FP8 activations must be float8_e4m3fn, got {x_q.dtype}")
    values = decode_float(x_q.view(torch.uint8), FP8_E4M3)
    return values * x_scale.float().reshape(*x_q.shape[:-1], 1)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token E4M3 quantization: ``s_m = amax(|x_m|) / 448``, ``q = e4m3(x / s)``.

    Returns ``(x_q float8_e4m3fn [..., K], x_scale fp32 [..., 1])`` (the activation side of
    W4A8-FP8 and FP8 W8A8, ZeroQuant-FP / vLLM dynamic per-token scaling).
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_E4M3.max_value, torch.ones_like(amax))
    x_q = (xf / scale).clamp(-FP8_E4M3.max_value, FP8_E4M3.max_value).to(torch.float8_e4m3fn)
    return x_q, scale
