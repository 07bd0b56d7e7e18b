"""Map a ptq :class:`~ptq.formats.QTensor` weight onto ONNX weight encodings.

What maps where (``W`` is ``[N, K]`` = ``[out, in]``, a block is ``r x c`` from the
weight's granularity, per channel ``c = K``, per tensor ``r = N, c = K``):

* ``com.microsoft.MatMulNBits`` (``weight_op="matmulnbits"``), integer elements of 2-8
  bits. Codes go into a ``bits``-bit unsigned container (4 for INT2-INT4, 8 for INT5-INT8)
  as ``u = q - q_min_container`` (``q + 2^(bits-1)`` for signed codes), so the runtime's
  ``(u - z_u) * s`` equals ptq's ``(q - z) * s`` exactly. The runtime block ``b`` is a
  power of two >= 16 with ``c % b == 0`` (each runtime block lies inside one ptq block and
  repeats its scale), or, when ``c >= K`` (per channel / per tensor), the largest
  power-of-two divisor of ``K`` up to 128 (128 with zero-point padding when ``K`` has
  none >= 16). A symmetric signed tensor needs no zero points (the default
  ``2^(bits-1)`` is exactly the offset); other cases store packed zero points.
* Blocked ``DequantizeLinear`` (opset 21, ``weight_op="dq"``): integer codes in an INT4
  (2-4 bits) or INT8 (5-8 bits) container, transposed to ``[K, N]``, with scales
  ``[ceil(K / c), N]`` (``block_size = c``, ``axis = 0``) or per-axis ``[N]`` when
  ``c >= K``; optional zero points of the codes' type.
* FP8 (E4M3/E5M2) weights always use ``DequantizeLinear`` from ``float8e4m3fn`` /
  ``float8e5m2`` (opset 19+), the same bytes as ptq's codes.

Scales are written with their sign: the ``full_range`` rule (``s = v* / -2^(b-1)``, ONNX
Runtime's own symmetric RTN rule) gives negative scales, which both ops apply as
``(u - z) * s`` like any other.

Anything else (FP4/FP6, MX, NVFP4, 2-D blocks whose rows are not one row) is refused with
an error naming the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto

from ptq.formats import FloatFormat, IntFormat, QTensor

FP8_TYPES = {"fp8_e4m3": TensorProto.FLOAT8E4M3FN, "fp8_e5m2": TensorProto.FLOAT8E5M2}
MAX_NBITS_BLOCK = 128


@dataclass(frozen=True)
class NBitsWeight:
    """Inputs and attributes of one ``MatMulNBits`` node.

    ``packed`` is uint8 ``[N, k_blocks, block * bits / 8]``, ``scales`` fp32
    ``[N * k_blocks]``, ``zero_points`` packed uint8 ``[N, ceil(k_blocks * bits / 8)]``
    or None (runtime default ``2^(bits - 1)``).
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int
    bits: int
    block_size: int


@dataclass(frozen=True)
class DQWeight:
    """A weight for ``DequantizeLinear`` then ``MatMul``: codes ``[K, N]`` plus scales.

    ``block_size`` 0 means per-axis (``axis = 1``, scale ``[N]``); otherwise blocked along
    ``axis = 0`` with scale ``[ceil(K / block_size), N]``.
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    onnx_type: int
    block_size: int


def _block_cols(q: QTensor) -> tuple[int, int]:
    rows, cols = q.shape
    return q.fmt.granularity.block_shape(rows, cols)


def _per_row_block_scales(q: QTensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` [R/r, C/c] repeated to one row per output channel: [N, C/c]."""
    r, _ = _block_cols(q)
    return values.repeat_interleave(r, dim=0)[: q.shape[0]]


def nbits_block_size(k: int, c: int) -> int:
    """The runtime block for a ptq block of ``c`` columns (see the module docstring)."""
    if c >= k:
        p = k & -k
        return min(p, MAX_NBITS_BLOCK) if p >= 16 else MAX_NBITS_BLOCK
    p = c & -c
    if p < 16:
        raise ValueError(f"group size {c} has no power-of-two divisor >= 16")
    return min(p, MAX_NBITS_BLOCK)


def _pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned values along the last axis, element 0 in the low bits of byte 0."""
    if bits == 8:
        return u.astype(np.uint8)
    per_byte = 8 // bits
    u = u.astype(np.uint8).reshape(*u.shape[:-1], -1, per_byte)
    out = np.zeros(u.shape[:-1], dtype=np.uint8)
    for i in range(per_byte):
        out |= u[..., i] << (i * bits)
    return out


def _int_codes(q: QTensor, layer: str) -> tuple[IntFormat, np.ndarray, np.ndarray | None]:
    el = q.fmt.element
    if not isinstance(el, IntFormat) or el.bits > 8:
        raise ValueError(f"{layer}: weight element {el.name} has no integer ONNX encoding")
    codes = q.codes.to(torch.int32).numpy()
    zp = None if q.zero_point is None else q.zero_point.to(torch.int32).numpy()
    return el, codes, zp


def to_matmulnbits(q: QTensor, layer: str) -> NBitsWeight:
    """Encode an integer ``QTensor`` as ``MatMulNBits`` inputs (exact, see module doc).

    Raises:
        ValueError: Not an integer element of <= 8 bits, or no valid runtime block.
    """
    el, codes, zp = _int_codes(q, layer)
    n, k = q.shape
    _, c = _block_cols(q)
    try:
        block = nbits_block_size(k, c)
    except ValueError as exc:
        raise ValueError(f"{layer}: {exc}; export with weight_op='dq'") from None
    bits = 4 if el.bits <= 4 else 8
    offset = -el.qmin if el.signed else 0
    k_blocks = -(-k // block)
    # column index of every runtime block -> ptq block column
    src_col = (np.arange(k_blocks) * block) // c
    eff = _per_row_block_scales(q, q.effective_scale().float()).numpy()
    scales = eff[:, src_col].astype(np.float32)
    if zp is None:
        zp_u = np.full((n, k_blocks), offset, dtype=np.int64)
    else:
        zp_u = _per_row_block_scales(q, torch.from_numpy(zp)).numpy()[:, src_col] + offset
    pad = k_blocks * block - k
    u = codes.astype(np.int64) + offset
    if pad:
        u = np.concatenate([u, np.repeat(zp_u[:, -1:], pad, axis=1)], axis=1)
    packed = _pack_bits(u.reshape(n, k_blocks, block), bits)
    zero_points = None
    if not np.all(zp_u == 2 ** (bits - 1)):
        per_byte = 8 // bits
        width = -(-k_blocks // per_byte) * per_byte
        zp_pad = np.full((n, width), 2 ** (bits - 1), dtype=np.int64)
        zp_pad[:, :k_blocks] = zp_u
        zero_points = _pack_bits(zp_pad, bits)
    return NBitsWeight(
        packed=np.ascontiguousarray(packed),
        scales=scales.reshape(-1),
        zero_points=zero_points,
        k=k,
        n=n,
        bits=bits,
        block_size=block,
    )


def to_dequantize_linear(q: QTensor, layer: str) -> DQWeight:
    """Encode ``q`` for ``DequantizeLinear`` (transposed ``[K, N]``; see module doc).

    Raises:
        ValueError: The element or granularity has no ``DequantizeLinear`` encoding.
    """
    k = q.shape[1]
    _, c = _block_cols(q)
    el = q.fmt.element
    if q.global_scale is not None and not isinstance(el, FloatFormat | IntFormat):
        raise ValueError(f"{layer}: unsupported two-level scale for {el.name}")
    eff = _per_row_block_scales(q, q.effective_scale().float()).numpy().astype(np.float32)
    block = 0 if c >= k else c
    scale = eff[:, 0] if block == 0 else eff.T
    if isinstance(el, FloatFormat):
        if el.name not in FP8_TYPES:
            raise ValueError(
                f"{layer}: weight element {el.name} has no ONNX encoding here "
                f"(supported: INT2-INT8, {', '.join(FP8_TYPES)})"
            )
        codes = q.codes.to(torch.uint8).numpy().T
        return DQWeight(
            np.ascontiguousarray(codes),
            np.ascontiguousarray(scale),
            None,
            FP8_TYPES[el.name],
            block,
        )
    el_int, icodes, zp = _int_codes(q, layer)
    if el_int.signed:
        onnx_type = TensorProto.INT4 if el_int.bits <= 4 else TensorProto.INT8
    else:
        onnx_type = TensorProto.UINT4 if el_int.bits <= 4 else TensorProto.UINT8
    zero = None
    if zp is not None:
        zfull = _per_row_block_scales(q, torch.from_numpy(zp)).numpy()
        zero = np.ascontiguousarray(zfull[:, 0] if block == 0 else zfull.T)
    return DQWeight(
        np.ascontiguousarray(icodes.T), np.ascontiguousarray(scale), zero, onnx_type, block
    )
