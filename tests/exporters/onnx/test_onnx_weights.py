"""Weight encodings for MatMulNBits and DequantizeLinear: golden bytes and exact decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptq.exporters.onnx.weights import nbits_block_size, to_dequantize_linear, to_matmulnbits
from ptq.formats import FP4_E2M1, INT3, INT4, INT8, PerChannel, PerGroup, QuantFormat, quantize


def _unpack4(packed: np.ndarray) -> np.ndarray:
    lo, hi = packed & 0x0F, packed >> 4
    return np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], -1)


def _dequant_nbits(w: object, n: int, k: int) -> np.ndarray:
    u = _unpack4(w.packed) if w.bits == 4 else w.packed  # type: ignore[attr-defined]
    u = u.reshape(n, -1).astype(np.float32)
    kb = u.shape[1] // w.block_size  # type: ignore[attr-defined]
    if w.zero_points is None:  # type: ignore[attr-defined]
        zp = np.full((n, kb), 2.0 ** (w.bits - 1), dtype=np.float32)  # type: ignore[attr-defined]
    else:
        zpu = _unpack4(w.zero_points) if w.bits == 4 else w.zero_points  # type: ignore[attr-defined]
        zp = zpu[:, :kb].astype(np.float32)
    s = w.scales.reshape(n, kb)  # type: ignore[attr-defined]
    bs = w.block_size  # type: ignore[attr-defined]
    full = (u - np.repeat(zp, bs, axis=1)) * np.repeat(s, bs, axis=1)
    return full[:, :k]


def test_golden_nibble_order() -> None:
    # one row, codes -8..7 twice over K=32 (block 32): u = q + 8 -> 0..15
    codes = torch.arange(-8, 8, dtype=torch.float32).repeat(2).reshape(1, 32)
    q = quantize(codes, QuantFormat(INT4, PerGroup(32)))  # amax 8 -> scale 8/7
    w = to_matmulnbits(q, "layer")
    assert w.bits == 4 and w.block_size == 32 and w.zero_points is None
    expected_u = q.codes.int().numpy()[0] + 8
    # byte j = u[2j] (low nibble) | u[2j+1] << 4
    assert w.packed.shape == (1, 1, 16)
    assert int(w.packed[0, 0, 0]) == int(expected_u[0] | (expected_u[1] << 4))
    assert np.array_equal(_unpack4(w.packed).reshape(-1), expected_u)


@pytest.mark.parametrize(
    ("fmt", "k"),
    [
        (QuantFormat(INT4, PerGroup(64)), 192),
        (QuantFormat(INT4, PerGroup(96)), 192),  # runtime block 32 repeats each scale 3x
        (QuantFormat(INT4, PerGroup(64), symmetric=False), 128),
        (QuantFormat(INT3, PerGroup(32)), 64),  # 3-bit codes in a 4-bit container
        (QuantFormat(INT8, PerChannel()), 576),  # K=576: block 64, scale repeated
        (QuantFormat(INT8, PerChannel()), 200),  # no pow2 divisor >= 16: padded block 128
    ],
)
def test_matmulnbits_decodes_to_emulated_weight(fmt: QuantFormat, k: int) -> None:
    x = torch.randn(24, k, generator=torch.Generator().manual_seed(k))
    q = quantize(x, fmt)
    from ptq.formats import dequantize

    w = to_matmulnbits(q, "layer")
    assert w.block_size >= 16 and w.block_size & (w.block_size - 1) == 0
    assert np.array_equal(_dequant_nbits(w, 24, k), dequantize(q).numpy())


def test_dequantize_linear_encoding_is_transposed_and_blocked() -> None:
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(1))
    q = quantize(x, QuantFormat(INT4, PerGroup(32)))
    w = to_dequantize_linear(q, "layer")
    assert w.codes.shape == (128, 8) and w.scale.shape == (4, 8) and w.block_size == 32
    from ptq.formats import dequantize

    deq = w.codes.astype(np.float32) * np.repeat(w.scale, 32, axis=0)
    assert np.array_equal(deq.T, dequantize(q).numpy())


def test_block_size_rules_and_refusals() -> None:
    assert nbits_block_size(576, 576) == 64
    assert nbits_block_size(1536, 128) == 128
    assert nbits_block_size(200, 200) == 128
    with pytest.raises(ValueError, match="power-of-two"):
        nbits_block_size(576, 24)
    q = quantize(torch.randn(4, 64), QuantFormat(FP4_E2M1, PerGroup(32)))
    with pytest.raises(ValueError, match=r"layer\.x"):
        to_matmulnbits(q, "layer.x")
    with pytest.raises(ValueError, match="no ONNX encoding"):
        to_dequantize_linear(q, "layer.x")
