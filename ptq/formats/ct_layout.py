"""QTensor <-> compressed-tensors tensors, for the formats compressed-tensors has.

Layouts (compressed-tensors 0.20, the names vLLM loads; ``N`` rows, ``K`` columns):

* ``pack-quantized`` (INT2/4/8, symmetric or asymmetric, group/channel):
  ``weight_packed`` int32 ``[N, ceil(K*b/32)]`` (:func:`~ptq.formats.packing.pack_int32`),
  ``weight_scale`` ``[N, K/g]``/``[N, 1]`` in the scale dtype, ``weight_shape`` int64
  ``[2]``, and for asymmetric ``weight_zero_point`` int32 packed along ``N``.
  Only 2/4/8 bits: 3/5/6/7-bit packing changed between compressed-tensors versions.
* ``int-quantized`` (symmetric INT8 weights of a layer whose activations are quantized,
  i.e. W8A8, as llm-compressor writes it and vLLM's INT8 W8A8 kernels read it): ``weight``
  int8 ``[N, K]`` (the codes), ``weight_scale`` ``[N, 1]`` or ``[N, K/g]``.
* ``float-quantized`` (FP8 E4M3, tensor/channel/group/block): ``weight`` float8_e4m3fn
  ``[N, K]``, ``weight_scale`` ``[1]``/``[N, 1]``/``[N, K/g]``/``[ceil(N/r), ceil(K/c)]``.
* ``nvfp4-pack-quantized``: ``weight_packed`` uint8 ``[N, K/2]`` (low nibble = even k),
  ``weight_scale`` float8_e4m3fn ``[N, K/16]``, ``weight_global_scale`` fp32 ``[1]``.
  Dequantization is ``e2m1 * (fp8(scale) / global)``: the division first, then the
  product, as compressed-tensors' ``_dequantize`` does (and as ``QTensor`` does).
* ``mxfp4-pack-quantized``: as NVFP4 with ``weight_scale`` uint8 E8M0 ``[N, K/32]``.
* ``mxfp8-quantized``: ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale`` uint8 E8M0.

Everything else (FP6, INT3/5/6, MXINT8, UE5M3 scales, any ExMy) uses
:mod:`ptq.formats.ptq_layout`.
"""

from __future__ import annotations

from typing import Any

import torch

from ptq.formats.element import FP4_E2M1, FP8_E4M3, IntFormat
from ptq.formats.granularity import PerBlock, PerChannel, PerGroup, PerTensor
from ptq.formats.packing import pack_bits, pack_int32, unpack_bits, unpack_int32
from ptq.formats.qformat import QTensor, QuantFormat
from ptq.formats.scales import e8m0_decode, e8m0_encode, scale_storage_dtype

CT_FORMATS = (
    "pack-quantized",
    "int-quantized",
    "float-quantized",
    "nvfp4-pack-quantized",
    "mxfp4-pack-quantized",
    "mxfp8-quantized",
)
_PLAIN_SCALES = ("fp32", "fp16", "bf16")


def ct_format_name(fmt: QuantFormat, quantized_activations: bool = False) -> str | None:
    """The compressed-tensors format that stores ``fmt`` exactly, or ``None``.

    Args:
        fmt: The weight format.
        quantized_activations: The layer also quantizes its input (W8A8): symmetric INT8
            weights then use ``int-quantized`` instead of ``pack-quantized``.
    """
    g, el = fmt.granularity, fmt.element
    if fmt.channel_scale or fmt.clip not in ("none", "mse"):
        return None
    if isinstance(el, IntFormat):
        ok_gran = isinstance(g, PerGroup) or (isinstance(g, PerChannel) and g.axis in (0, -2))
        if el.signed and el.bits in (2, 4, 8) and ok_gran and not fmt.global_scale:
            if fmt.scale_format not in _PLAIN_SCALES:
                return None
            w8a8 = quantized_activations and el.bits == 8 and fmt.symmetric
            return "int-quantized" if w8a8 else "pack-quantized"
        return None
    if el == FP4_E2M1 and g == PerGroup(16) and fmt.scale_format == "e4m3" and fmt.global_scale:
        return "nvfp4-pack-quantized"
    if el == FP4_E2M1 and g == PerGroup(32) and fmt.scale_format == "e8m0":
        return "mxfp4-pack-quantized"
    if el == FP8_E4M3 and g == PerGroup(32) and fmt.scale_format == "e8m0":
        return "mxfp8-quantized"
    if el == FP8_E4M3 and fmt.scale_format in _PLAIN_SCALES and not fmt.global_scale:
        if isinstance(g, PerChannel) and g.axis not in (0, -2):
            return None
        return "float-quantized"
    return None


def _require(fmt: QuantFormat, quantized_activations: bool = False) -> str:
    name = ct_format_name(fmt, quantized_activations)
    if name is None:
        raise ValueError(
            f"format {fmt.name or fmt.element.name} has no compressed-tensors layout "
            f"(supported: {', '.join(CT_FORMATS)}); use ptq.formats.ptq_layout"
        )
    return name


def ct_weight_args(fmt: QuantFormat) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` fields (weights) describing ``fmt``."""
    _require(fmt)
    g = fmt.granularity
    args: dict[str, Any] = {
        "num_bits": fmt.element.bits,
        "type": "int" if isinstance(fmt.element, IntFormat) else "float",
        "symmetric": fmt.symmetric,
        "dynamic": False,
    }
    if isinstance(g, PerGroup):
        args["strategy"] = "tensor_group" if fmt.global_scale else "group"
        args["group_size"] = g.size
    elif isinstance(g, PerChannel):
        args["strategy"] = "channel"
    elif isinstance(g, PerBlock):
        args["strategy"] = "block"
        args["block_structure"] = [g.rows, g.cols]
    else:
        args["strategy"] = "tensor"
    if fmt.scale_format == "e8m0":
        args["scale_dtype"] = torch.uint8
    return args


def _plain_scale(q: QTensor) -> torch.Tensor:
    s = q.scale.to(scale_storage_dtype(q.fmt.scale_format))
    return s.reshape(1) if isinstance(q.fmt.granularity, PerTensor) else s


def to_compressed_tensors(
    q: QTensor, quantized_activations: bool = False
) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors (``weight_*`` names) that hold ``q`` exactly.

    Args:
        q: The quantized weight.
        quantized_activations: The layer quantizes its input too (see :func:`ct_format_name`).
    """
    name = _require(q.fmt, quantized_activations)
    n, k = q.shape
    if name == "int-quantized":
        return {"weight": q.codes.to(torch.int8), "weight_scale": _plain_scale(q)}
    if name == "pack-quantized":
        bits = q.fmt.element.bits
        out = {
            "weight_packed": pack_int32(q.codes, bits),
            "weight_scale": _plain_scale(q),
            "weight_shape": torch.tensor([n, k], dtype=torch.int64),
        }
        if q.zero_point is not None:
            out["weight_zero_point"] = pack_int32(q.zero_point.T, bits).T.contiguous()
        return out
    if name == "float-quantized":
        return {"weight": q.codes.view(torch.float8_e4m3fn), "weight_scale": _plain_scale(q)}
    if name == "mxfp8-quantized":
        return {"weight": q.codes.view(torch.float8_e4m3fn), "weight_scale": e8m0_encode(q.scale)}
    out = {"weight_packed": pack_bits(q.codes, 4)}
    if name == "mxfp4-pack-quantized":
        out["weight_scale"] = e8m0_encode(q.scale)
        return out
    assert q.global_scale is not None
    out["weight_scale"] = q.scale.to(torch.float8_e4m3fn)
    out["weight_global_scale"] = q.global_scale.float().reshape(1)
    return out


def from_compressed_tensors(d: dict[str, torch.Tensor], fmt: QuantFormat) -> QTensor:
    """Inverse of :func:`to_compressed_tensors` for a tensor of format ``fmt``.

    The layout is told apart by its tensors: INT8 ``weight`` codes are ``int-quantized``.
    """
    name = _require(fmt)
    if name == "pack-quantized" and "weight" in d and "weight_packed" not in d:
        scale = d["weight_scale"].float()
        return QTensor(d["weight"].to(torch.int8), scale.reshape(-1, scale.shape[-1]), fmt)
    if name == "pack-quantized":
        n, k = (int(v) for v in d["weight_shape"].tolist())
        bits = fmt.element.bits
        codes = unpack_int32(d["weight_packed"], bits, k)
        scale = d["weight_scale"].float().reshape(-1, d["weight_scale"].shape[-1])
        zp = None
        if "weight_zero_point" in d:
            zp = unpack_int32(d["weight_zero_point"].T.contiguous(), bits, n).T.contiguous()
        return QTensor(codes, scale, fmt, zero_point=zp)
    if name in ("float-quantized", "mxfp8-quantized"):
        codes = d["weight"].view(torch.uint8)
        s = d["weight_scale"]
        scale = e8m0_decode(s) if name == "mxfp8-quantized" else s.float()
        return QTensor(codes, scale.reshape(-1, scale.shape[-1]), fmt)
    packed = d["weight_packed"]
    codes = unpack_bits(packed, 4, packed.shape[1] * 2)
    if name == "mxfp4-pack-quantized":
        return QTensor(codes, e8m0_decode(d["weight_scale"]), fmt)
    gs = d["weight_global_scale"].float().reshape(1)
    return QTensor(codes, d["weight_scale"].float(), fmt, global_scale=gs)
