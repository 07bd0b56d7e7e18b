"""Bit packing of quantized codes into the byte layouts other tools read.

One rule underlies every layout here: a row of ``n`` codes of ``b`` bits is a
little-endian bit stream, element ``i`` occupying bits ``i*b .. i*b + b - 1`` (bit ``k``
of the stream is bit ``k % 8`` of byte ``k // 8``). Elements may straddle bytes/words.

* :func:`pack_bits` -- the stream as uint8 bytes ``[rows, ceil(n*b/8)]``. For ``b = 4``
  this is the nibble layout of NVFP4/MXFP4 and ONNX Runtime's MatMulNBits (first
  element in the low nibble).
* :func:`pack_int32` -- compressed-tensors' ``pack-quantized`` layout: the same stream
  read as little-endian int32 words ``[rows, ceil(n*b/32)]``, storing ``u = q + 2^(b-1)``
  for signed codes ``q``.
* :func:`pack_matmul_nbits` -- MatMulNBits' ``B`` input ``[N, ceil(K/block), block*b/8]``.

Scale bytes (E8M0, E4M3, UE5M3) are in :mod:`ptq.formats.scales`
(``scale_to_bytes``/``scale_from_bytes``); re-exported here for convenience.
"""

from __future__ import annotations

import math

import torch

from ptq.formats.scales import e8m0_decode, e8m0_encode, scale_from_bytes, scale_to_bytes

__all__ = [
    "e4m3_decode",
    "e4m3_encode",
    "e8m0_decode",
    "e8m0_encode",
    "pack_bits",
    "pack_int32",
    "pack_matmul_nbits",
    "pack_nibbles",
    "unpack_bits",
    "unpack_int32",
    "unpack_matmul_nbits",
    "unpack_nibbles",
]


def _check(bits: int, t: torch.Tensor, what: str) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"{what}: bits must be in 1..8, got {bits}")
    if t.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D tensor, got shape {tuple(t.shape)}")


def pack_bits(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``u`` [rows, n] (values < 2^bits) into uint8 [rows, ceil(n*b/8)]."""
    _check(bits, u, "pack_bits")
    rows, n = u.shape
    nbytes = math.ceil(n * bits / 8)
    if n and (int(u.min()) < 0 or int(u.max()) >= 2**bits):
        raise ValueError(f"pack_bits: codes must lie in [0, {2**bits - 1}]")
    v = u.to(torch.int32)
    if 8 % bits == 0:  # whole codes per byte: shift-and-add within each byte
        per = 8 // bits
        v = torch.nn.functional.pad(v, (0, nbytes * per - n)).reshape(rows, nbytes, per)
        shifts = torch.arange(0, 8, bits, device=u.device, dtype=torch.int32)
        return (v << shifts).sum(dim=-1).to(torch.uint8)
    shifts = torch.arange(bits, device=u.device, dtype=torch.int32)
    stream = ((v.unsqueeze(-1) >> shifts) & 1).reshape(rows, n * bits)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - n * bits))
    weights = torch.arange(8, device=u.device, dtype=torch.int32)
    return (stream.reshape(rows, nbytes, 8) << weights).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 [rows, nbytes] to codes uint8 [rows, n]."""
    _check(bits, packed, "unpack_bits")
    if packed.dtype != torch.uint8 or packed.shape[1] * 8 < n * bits:
        raise ValueError(f"unpack_bits: need uint8 with >= {n * bits} bits per row")
    rows = packed.shape[0]
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=p.device, dtype=torch.int32)
        codes = (p.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(rows, -1)[:, :n].to(torch.uint8)
    # Element i starts at stream bit t = i*b: bit t % 8 of byte t // 8. With b <= 8 it
    # ends within the next byte (t % 8 + b <= 15), so it is bits t % 8 .. of the 16-bit
    # little-endian pair (byte t // 8, byte t // 8 + 1); one spare zero byte pads the end.
    start = torch.arange(n, device=p.device, dtype=torch.int64) * bits
    lo = start // 8
    p = torch.nn.functional.pad(p, (0, 1))
    pair = p[:, lo] | (p[:, lo + 1] << 8)
    return ((pair >> (start % 8).to(torch.int32)) & (2**bits - 1)).to(torch.uint8)


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes ``q`` [rows, n] to compressed-tensors' int32 [rows, ceil(n*b/32)].

    Stores ``u = q + 2^(b-1)``; word ``w`` holds stream bits ``32w .. 32w+31`` with stream
    bit ``32w + j`` at bit ``j`` of the word (little-endian, host-independent).
    """
    _check(bits, q, "pack_int32")
    rows, n = q.shape
    if n and (int(q.min()) < -(2 ** (bits - 1)) or int(q.max()) >= 2 ** (bits - 1)):
        half = 2 ** (bits - 1)
        raise ValueError(f"pack_int32: codes must lie in [{-half}, {half - 1}]")
    stream = pack_bits(q.to(torch.int32) + 2 ** (bits - 1), bits)
    words = math.ceil(n * bits / 32)
    stream = torch.nn.functional.pad(stream, (0, words * 4 - stream.shape[1]))
    b = stream.to(torch.int64).reshape(rows, words, 4)
    shifts = torch.arange(0, 32, 8, device=q.device, dtype=torch.int64)
    w = (b << shifts).sum(dim=-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words to signed codes int8 [rows, n]."""
    _check(bits, packed, "unpack_int32")
    if packed.dtype != torch.int32:
        raise ValueError(f"unpack_int32: expected int32 words, got {packed.dtype}")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 8, device=packed.device, dtype=torch.int64)
    stream = ((w.unsqueeze(-1) >> shifts) & 0xFF).reshape(packed.shape[0], -1).to(torch.uint8)
    u = unpack_bits(stream, bits, n)
    return (u.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [rows, n] to uint8 [rows, ceil(n/2)]: element 2j low nibble, 2j+1 high."""
    return pack_bits(codes, 4)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`."""
    return unpack_bits(packed, 4, n)


def pack_matmul_nbits(u: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Unsigned codes [N, K] to MatMulNBits' ``B`` uint8 [N, ceil(K/block), block*b/8].

    The last block is zero-padded. ``block * bits`` must be a multiple of 8.
    """
    _check(bits, u, "pack_matmul_nbits")
    if block < 1 or block * bits % 8:
        raise ValueError(f"MatMulNBits block {block} x {bits} bits is not whole bytes")
    rows, k = u.shape
    nblk = math.ceil(k / block)
    u = torch.nn.functional.pad(u, (0, nblk * block - k)).reshape(rows * nblk, block)
    return pack_bits(u, bits).reshape(rows, nblk, block * bits // 8)


def unpack_matmul_nbits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_matmul_nbits`: uint8 [N, k_blocks, bytes] to codes [N, K]."""
    if packed.dim() != 3:
        raise ValueError(f"MatMulNBits B must be 3-D, got shape {tuple(packed.shape)}")
    rows, nblk, nbytes = packed.shape
    block = nbytes * 8 // bits
    u = unpack_bits(packed.reshape(rows * nblk, nbytes), bits, block)
    return u.reshape(rows, nblk * block)[:, :k]


def e4m3_encode(scale: torch.Tensor) -> torch.Tensor:
    """E4M3 scale values (fp32 on the grid) to their fp8 bytes (uint8)."""
    return scale_to_bytes(scale, "e4m3")


def e4m3_decode(codes: torch.Tensor) -> torch.Tensor:
    """E4M3 bytes to fp32 values."""
    return scale_from_bytes(codes, "e4m3")
