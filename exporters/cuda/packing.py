"""Pack a :class:`ptq.formats.QTensor` into the on-disk layouts the kernels read.

One :class:`PackedWeight` per quantized Linear: the format name, the tensors under their
on-disk names and the group size (docs/layouts.md; LAYOUT.md): compressed-tensors layouts
for INT4, FP4, INT8 and FP8, and ptq's own layout
(:func:`ptq.formats.ptq_layout.to_ptq_layout`, the writer of ``--target ptq`` outputs)
for the bit-stream formats INT3/5/6 and FP6 E2M3/E3M2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.exporters.cuda.reference import BITSTREAM_ELEMENTS
from ptq.formats import (
    FP4_E2M1,
    FP8_E4M3,
    INT4,
    INT8,
    PerChannel,
    PerGroup,
    QTensor,
    QuantFormat,
)
from ptq.formats.ptq_layout import to_ptq_layout

WEIGHT_FORMATS = ("int4", "nvfp4", "mxfp4", "int8", "fp8", *BITSTREAM_ELEMENTS)
BITSTREAM_SCALES = ("fp32", "fp16", "bf16", "e8m0", "pow2")


@dataclass(frozen=True)
class PackedWeight:
    """Packed weight tensors of one ``[N, K]`` matrix.

    Attributes:
        format: One of :data:`WEIGHT_FORMATS`.
        weight: ``weight_packed`` (int4: int32 ``[N, K/8]``; fp4: uint8 ``[N, K/2]``;
            bit streams of b bits: uint8 ``[N, ceil(K*b/8)]``) or ``weight`` (int8 /
            float8_e4m3fn ``[N, K]``).
        weight_scale: Group scales ``[N, K/g]`` (bit streams: float, or uint8 E8M0 codes)
            or per-channel ``[N, 1]``.
        group_size: Elements per scale along K (K for per-channel formats).
        weight_zero_point: Asymmetric zero points: INT4 int32 ``[ceil(N/8), K/g]`` packed
            along N; bit-stream integers int8 ``[N, K/g]``.
        weight_global_scale: NVFP4 fp32 ``[1]``.
    """

    format: str
    weight: torch.Tensor
    weight_scale: torch.Tensor
    group_size: int
    weight_zero_point: torch.Tensor | None = None
    weight_global_scale: torch.Tensor | None = None


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 to the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int4_codes(u: torch.Tensor) -> torch.Tensor:
    """Unsigned nibbles ``[R, C]`` (C % 8 == 0) to int32 ``[R, C/8]``, element i at bits 4i."""
    rows, cols = u.shape
    if cols % 8:
        raise ValueError(f"INT4 packing needs a multiple of 8 columns, got {cols}")
    shifts = torch.arange(8, device=u.device, dtype=torch.int64) * 4
    words = (u.to(torch.int64).reshape(rows, cols // 8, 8) << shifts).sum(dim=-1)
    return _to_int32(words)


def pack_zero_points(z: torch.Tensor) -> torch.Tensor:
    """Unsigned zero points ``[N, G]`` to int32 ``[ceil(N/8), G]`` packed along N."""
    rows = z.shape[0]
    pad = (-rows) % 8
    zp = torch.nn.functional.pad(z.to(torch.int64), (0, 0, 0, pad))
    return pack_int4_codes(zp.t().contiguous()).t().contiguous()


def pack_fp4_codes(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes uint8 ``[N, K]`` to uint8 ``[N, K/2]`` (low nibble = even k)."""
    if codes.shape[1] % 2:
        raise ValueError(f"FP4 packing needs an even K, got {codes.shape[1]}")
    c = codes.to(torch.uint8) & 0xF
    return c[:, 0::2] | (c[:, 1::2] << 4)


def bitstream_name(fmt: QuantFormat) -> str | None:
    """The bit-stream kernel format serving weights of ``fmt``, or None.

    INT3/5/6 (symmetric or asymmetric) or FP6 E2M3/E3M2 with power-of-two groups >= 32 of
    fp32/fp16/bf16 or E8M0 (also ``pow2``, stored as E8M0) scales and no second level.
    """
    gran = fmt.granularity
    name = next((n for n, el in BITSTREAM_ELEMENTS.items() if el == fmt.element), None)
    grouped = isinstance(gran, PerGroup) and gran.size >= 32 and gran.size & (gran.size - 1) == 0
    single_level = not fmt.global_scale and not fmt.channel_scale
    if name is None or not grouped or not single_level:
        return None
    return name if fmt.scale_format in BITSTREAM_SCALES else None


def pack_bitstream(q: QTensor) -> PackedWeight:
    """``q``'s ptq-layout tensors (the ``--target ptq`` writer's bytes) as a PackedWeight.

    Raises:
        ValueError: ``q`` is not a bit-stream kernel format (:func:`bitstream_name`).
    """
    name = bitstream_name(q.fmt)
    if name is None:
        raise ValueError(f"{q.fmt.element.name} {q.fmt.granularity.name} has no bit-stream kernel")
    d = to_ptq_layout(q)
    assert isinstance(q.fmt.granularity, PerGroup)
    return PackedWeight(
        name,
        d["weight_packed"],
        d["weight_scale"],
        q.fmt.granularity.size,
        weight_zero_point=d.get("weight_zero_point"),
    )


def pack_qtensor(q: QTensor, scale_dtype: torch.dtype = torch.float16) -> PackedWeight:
    """Pack ``q`` for the kernels; raise ``ValueError`` for formats they do not serve.

    Args:
        q: Quantized ``[N, K]`` weight from :func:`ptq.formats.quantize`.
        scale_dtype: Storage dtype of INT4 group scales and per-channel scales
            (compressed-tensors writes the model dtype; fp32 keeps them exact). Bit-stream
            formats keep the ptq layout's scales (the format's own scale dtype, exact).
    """
    fmt, gran = q.fmt, q.fmt.granularity
    rows, cols = q.shape
    if bitstream_name(fmt) is not None:
        return pack_bitstream(q)
    if fmt.element == INT4 and isinstance(gran, PerGroup):
        zp = None if q.zero_point is None else pack_zero_points(q.zero_point.long() + 8)
        return PackedWeight(
            "int4", pack_int4_codes(q.codes.long() + 8), q.scale.to(scale_dtype), gran.size, zp
        )
    if fmt.element == FP4_E2M1 and isinstance(gran, PerGroup):
        packed = pack_fp4_codes(q.codes)
        if fmt.scale_format == "e4m3" and gran.size == 16 and q.global_scale is not None:
            scale = q.scale.to(torch.float8_e4m3fn)
            gs = q.global_scale.float().reshape(1)
            return PackedWeight("nvfp4", packed, scale, 16, weight_global_scale=gs)
        if fmt.scale_format == "e8m0" and gran.size == 32:
            e = torch.log2(q.scale).round().to(torch.int32) + 127
            return PackedWeight("mxfp4", packed, e.clamp(0, 254).to(torch.uint8), 32)
    per_channel = isinstance(gran, PerChannel) and gran.axis in (0, -2) and fmt.symmetric
    if per_channel and fmt.element == INT8:
        return PackedWeight("int8", q.codes.to(torch.int8), q.scale.to(scale_dtype), cols)
    if per_channel and fmt.element == FP8_E4M3:
        weight = q.codes.to(torch.uint8).view(torch.float8_e4m3fn)
        return PackedWeight("fp8", weight, q.scale.to(scale_dtype), cols)
    raise ValueError(
        f"no CUDA kernel for {fmt.element.name} with {gran.name} granularity "
        f"(scale {fmt.scale_format}, symmetric={fmt.symmetric}) on a {rows}x{cols} weight; "
        "supported: INT4 per-group (sym/asym), NVFP4 (E4M3/16 + global), MXFP4 (E8M0/32), "
        "INT8 and FP8 E4M3 per-channel, INT3/5/6 (sym/asym) and FP6 E2M3/E3M2 in power-of-two "
        "groups >= 32 with fp32/fp16/bf16/E8M0 scales"
    )
