"""Candidate weight formats for mixed-precision allocation, and their exact cost per layer.

A *candidate* is one way of storing a linear layer's weight ``W`` [N, K] (``N`` outputs,
``K`` inputs): a :class:`~ptq.formats.QuantFormat` (or ``None``: keep the dense 16-bit
weight), optionally plus a LoRC low-rank error correction ``W ~ Q(W) + U V`` with
``U`` [N, r] and ``V`` [r, K] (Yao et al., "ZeroQuant-V2", 2023).

Its size in bytes is counted exactly, as an exporter lays it out:

    codes   = N * ceil(K * b / w) * w / 8             (rows packed into w-bit words)
    scales  = ceil(N / r_s) * ceil(K / c_s) * s / 8   ((r_s, c_s) = granularity block,
                                                       s = bits of the scale format)
    zeros   = ceil(#scales * b / 8)                   (asymmetric integers only)
    global  = 4                                       (fp32 second level, NVFP4)
    rows    = 4 * N                                   (fp32 per-row scale, ZeroQuant-FP M2)
    lorc    = bytes(U [N, r]) + bytes(V [r, K])        (in the factor format)

and its modelled batch-1 decode latency is the memory-bound roofline
``t = bytes / (bandwidth * efficiency[name])`` (weights streamed once per token; see
docs/invariants.md, "Serving arithmetic").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from ptq.formats import QuantFormat
from ptq.formats.scales import SCALE_BITS

H200_BANDWIDTH = 4.8e12
"""Peak HBM bandwidth of one H200 in bytes per second (docs/invariants.md, "Serving arithmetic")."""


@dataclass(frozen=True)
class Candidate:
    """One storage choice for a layer's weight.

    Args:
        name: Unique display/lookup name (e.g. ``"int4_g128"``).
        fmt: The weight format, or ``None`` to keep the dense weight.
        lorc_rank: Rank ``r`` of the LoRC correction ``U V`` (0: none).
        lorc_format: Format of ``U`` and ``V``; ``None`` stores them dense.
        dense_bits: Bits per element of dense storage (the kept weight, dense factors).
    """

    name: str
    fmt: QuantFormat | None
    lorc_rank: int = 0
    lorc_format: QuantFormat | None = None
    dense_bits: int = 16

    def __post_init__(self) -> None:
        if not self.name or "," in self.name or self.name != self.name.strip():
            raise ValueError(f"candidate name must be non-empty, without commas: {self.name!r}")
        if self.lorc_rank < 0:
            raise ValueError(f"candidate {self.name!r}: LoRC rank must be >= 0")
        if self.fmt is None and self.lorc_rank:
            raise ValueError(f"candidate {self.name!r}: LoRC needs a quantized weight format")
        if self.lorc_format is not None and not self.lorc_rank:
            raise ValueError(f"candidate {self.name!r}: a LoRC factor format needs a rank > 0")
        if self.dense_bits not in (8, 16, 32):
            raise ValueError(f"candidate {self.name!r}: dense_bits must be 8, 16 or 32")

    @property
    def element_bits(self) -> int:
        """Bits of one weight element (``dense_bits`` when kept dense)."""
        return self.dense_bits if self.fmt is None else self.fmt.bits


def tensor_bytes(fmt: QuantFormat, rows: int, cols: int, word_bits: int = 8) -> int:
    """Exact bytes of a ``rows x cols`` tensor quantized to ``fmt`` (codes + scales).

    Args:
        fmt: The format; its granularity's ``block_shape`` gives the scale grid.
        rows: ``N`` (output features).
        cols: ``K`` (reduction size), packed along each row.
        word_bits: Packing word (8: uint8 like MatMulNBits/NVFP4, 32: int32 like
            compressed-tensors ``pack-quantized``); each row is padded to whole words.

    Raises:
        ValueError: non-positive sizes, or a granularity that does not fit the shape.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"tensor shape must be positive, got {rows}x{cols}")
    if word_bits % 8 or word_bits < 8:
        raise ValueError(f"word_bits must be a positive multiple of 8, got {word_bits}")
    bits = fmt.bits
    codes = rows * math.ceil(cols * bits / word_bits) * (word_bits // 8)
    block_r, block_c = fmt.granularity.block_shape(rows, cols)
    n_scales = math.ceil(rows / block_r) * math.ceil(cols / block_c)
    scales = n_scales * SCALE_BITS[fmt.scale_format] // 8
    zeros = 0 if fmt.symmetric else math.ceil(n_scales * bits / 8)
    second = 4 if fmt.global_scale else 0
    per_row = 4 * rows if fmt.channel_scale else 0
    return codes + scales + zeros + second + per_row


def candidate_bytes(
    candidate: Candidate, out_features: int, in_features: int, word_bits: int = 8
) -> int:
    """Exact storage of a weight [out_features, in_features] under ``candidate``.

    Dense: ``ceil(N * K * dense_bits / 8)``. Quantized: :func:`tensor_bytes` of the
    weight plus, with LoRC of rank ``r``, the factors ``U`` [N, r] and ``V`` [r, K]
    (dense, or in ``lorc_format``). Biases are not counted: every candidate keeps them.

    Raises:
        ValueError: non-positive shape, or a granularity that does not divide it (the
            message names the candidate).
    """
    n, k = out_features, in_features
    if n < 1 or k < 1:
        raise ValueError(f"layer shape must be positive, got {n}x{k}")
    if candidate.fmt is None:
        return math.ceil(n * k * candidate.dense_bits / 8)
    try:
        total = tensor_bytes(candidate.fmt, n, k, word_bits)
        r = candidate.lorc_rank
        if r:
            if candidate.lorc_format is None:
                total += math.ceil((n * r + r * k) * candidate.dense_bits / 8)
            else:
                total += tensor_bytes(candidate.lorc_format, n, r, word_bits)
                total += tensor_bytes(candidate.lorc_format, r, k, word_bits)
    except ValueError as err:
        raise ValueError(
            f"candidate {candidate.name!r} does not fit a {n}x{k} weight: {err}"
        ) from err
    return total


@dataclass(frozen=True)
class LatencyModel:
    """Memory-bound roofline for batch-1 decode: ``t = bytes / (bandwidth * eff[name])``.

    Args:
        bandwidth: Bytes per second (default: one H200, 4.8 TB/s).
        efficiency: Fraction of ``bandwidth`` the kernel for each candidate reaches,
            by candidate name or glob pattern (``int4_*``); see :meth:`eff`.
        default_efficiency: Efficiency of candidates not in ``efficiency``.
    """

    bandwidth: float = H200_BANDWIDTH
    efficiency: Mapping[str, float] = field(default_factory=dict, hash=False)
    default_efficiency: float = 1.0

    def __post_init__(self) -> None:
        if not (self.bandwidth > 0 and math.isfinite(self.bandwidth)):
            raise ValueError(f"bandwidth must be a positive number of bytes/s: {self.bandwidth}")
        for name, eff in {**self.efficiency, "<default>": self.default_efficiency}.items():
            if not (eff > 0 and math.isfinite(eff)):
                raise ValueError(f"efficiency of {name!r} must be positive and finite: {eff}")

    def eff(self, name: str) -> float:
        """Efficiency of candidate ``name``: its exact entry, else the first glob key
        (in table order) that matches it, else ``default_efficiency``."""
        if name in self.efficiency:
            return self.efficiency[name]
        for key, value in self.efficiency.items():
            if fnmatchcase(name, key):
                return value
        return self.default_efficiency

    def seconds(self, candidate: Candidate, out_features: int, in_features: int) -> float:
        """Modelled time to stream this layer's weight once, in seconds."""
        eff = self.eff(candidate.name)
        return candidate_bytes(candidate, out_features, in_features) / self.bandwidth / eff
