"""ptq's own on-disk layout, for formats compressed-tensors lacks (FP6, INT3/5/6, MXINT8,
UE5M3 scales, any ExMy), and usable for every format. Round trips are bit-exact.

Tensors (``N x K`` weight, ``b`` element bits, scales ``[Sr, Sc]``):

* ``weight_packed`` uint8 ``[N, ceil(K*b/8)]``: per row, a little-endian bit stream
  (element ``i`` at bits ``i*b ..``, :func:`~ptq.formats.packing.pack_bits`) of
  ``u = code`` for minifloats (the bit pattern) and unsigned integers, and
  ``u = q + 2^(b-1)`` for signed integers (offset binary, as compressed-tensors).
* ``weight_scale``: 8-bit scale formats (e8m0, pow2 as e8m0, e4m3, ue5m3) as their uint8
  codes; fp32/fp16/bf16 in that dtype. Shape ``[Sr, Sc]``.
* ``weight_zero_point`` int8 ``[Sr, Sc]`` (asymmetric only), ``weight_global_scale``
  fp32 ``[1]`` (NVFP4-style), ``weight_channel_scale`` fp32 ``[N, 1]`` (ZeroQuant-FP M2).
* ``weight_shape`` int64 ``[2]``; ``weight_format`` uint8: the UTF-8 JSON
  :mod:`~ptq.formats.descriptor` of the format (element, granularity, scales...).
"""

from __future__ import annotations

import torch

from ptq.formats.descriptor import descriptor_from_tensor, descriptor_tensor
from ptq.formats.element import IntFormat
from ptq.formats.packing import pack_bits, unpack_bits
from ptq.formats.qformat import QTensor
from ptq.formats.scales import scale_from_bytes, scale_storage_dtype, scale_to_bytes


def _offset(q: QTensor) -> int:
    el = q.fmt.element
    return 2 ** (el.bits - 1) if isinstance(el, IntFormat) and el.signed else 0


def to_ptq_layout(q: QTensor) -> dict[str, torch.Tensor]:
    """``q`` as ptq-layout tensors (see the module docstring)."""
    el = q.fmt.element
    if el.bits > 8:
        raise ValueError(f"ptq layout packs elements of <= 8 bits, got {el.name}")
    u = (q.codes.to(torch.int32) + _offset(q)) & (2**el.bits - 1)
    dtype = scale_storage_dtype(q.fmt.scale_format)
    scale = (
        scale_to_bytes(q.scale, q.fmt.scale_format) if dtype == torch.uint8 else q.scale.to(dtype)
    )
    out = {
        "weight_packed": pack_bits(u, el.bits),
        "weight_scale": scale,
        "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64),
        "weight_format": descriptor_tensor(q.fmt),
    }
    if q.zero_point is not None:
        out["weight_zero_point"] = q.zero_point
    if q.global_scale is not None:
        out["weight_global_scale"] = q.global_scale.float().reshape(1)
    if q.channel_scale is not None:
        out["weight_channel_scale"] = q.channel_scale.float()
    return out


def from_ptq_layout(d: dict[str, torch.Tensor]) -> QTensor:
    """Inverse of :func:`to_ptq_layout`.

    Raises:
        ValueError: A required tensor is missing (names it) or the descriptor is bad.
    """
    for key in ("weight_packed", "weight_scale", "weight_shape", "weight_format"):
        if key not in d:
            raise ValueError(f"ptq layout is missing {key!r}")
    fmt = descriptor_from_tensor(d["weight_format"])
    _, k = (int(v) for v in d["weight_shape"].tolist())
    el = fmt.element
    u = unpack_bits(d["weight_packed"], el.bits, k).to(torch.int32)
    scale_t = d["weight_scale"]
    scale = scale_from_bytes(scale_t, fmt.scale_format) if scale_t.dtype == torch.uint8 else scale_t
    q = QTensor(u.to(torch.uint8), scale.float(), fmt)
    if isinstance(el, IntFormat):
        q.codes = (u - (2 ** (el.bits - 1) if el.signed else 0)).to(
            torch.int8 if el.signed else torch.uint8
        )
    if "weight_zero_point" in d:
        q.zero_point = d["weight_zero_point"]
    if "weight_global_scale" in d:
        q.global_scale = d["weight_global_scale"].float().reshape(1)
    if "weight_channel_scale" in d:
        q.channel_scale = d["weight_channel_scale"].float()
    return q
