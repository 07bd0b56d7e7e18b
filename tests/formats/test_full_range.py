"""The ``full_range`` scale rule: golden bits, ONNX Runtime's quantizer, compressed-tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from ptq.formats import (
    INT2,
    INT4,
    INT8,
    MXINT8,
    PerChannel,
    PerGroup,
    QuantFormat,
    dequantize,
    fake_quantize,
    quantize,
)
from ptq.formats.ct_layout import ct_weight_args, from_compressed_tensors, to_compressed_tensors

# One row, four groups of four (scale rule full_range, fp16 scales):
#   A [0.5, -2, 1, 0.25]  v* = -2  s = 0.25   codes [2, -8, 4, 1]
#   B [3, -1, 0, -3]      tie |3| = |-3|: the negative wins, v* = -3, s = 0.375,
#                         3 / 0.375 = 8 saturates to 7: codes [7, -3, 0, -8]
#   C [1, -0.2, 0.1, 0.7] v* = 1  s = -0.125  codes [-8, 2, -1, -6] (1.6 -> 2, -0.8 -> -1,
#                         -5.6 -> -6)
#   D zeros               s = 1 (never 0)     codes [0, 0, 0, 0]
ROW = [0.5, -2.0, 1.0, 0.25, 3.0, -1.0, 0.0, -3.0, 1.0, -0.2, 0.1, 0.7, 0.0, 0.0, 0.0, 0.0]
CODES = [2, -8, 4, 1, 7, -3, 0, -8, -8, 2, -1, -6, 0, 0, 0, 0]
# fp16 bits: 0.25 = 0 01101 0000000000, 0.375 = 0 01101 1000000000,
# -0.125 = 1 01100 0000000000, 1.0 = 0 01111 0000000000
SCALE_BITS_FP16 = [0x3400, 0x3600, 0xB000, 0x3C00]
# two's-complement nibbles of CODES: 0010 1000 0100 0001 | 0111 1101 0000 1000 | ...
NIBBLES = [0x2, 0x8, 0x4, 0x1, 0x7, 0xD, 0x0, 0x8, 0x8, 0x2, 0xF, 0xA, 0x0, 0x0, 0x0, 0x0]
# pack-quantized stores u = q + 8 at bit 4i of int32 words (element 0 lowest):
# u = [10 0 12 9 15 5 8 0 | 0 10 7 2 8 8 8 8] -> 0x085F9C0A, 0x888827A0
PACKED = [0x085F9C0A, 0x888827A0 - 2**32]

FR_G4 = QuantFormat(INT4, PerGroup(4), scale_format="fp16", scale_rule="full_range")


def test_golden_codes_scales_and_packing() -> None:
    x = torch.tensor([ROW])
    q = quantize(x, FR_G4)
    assert q.codes.tolist() == [CODES]
    assert q.scale.to(torch.float16).view(torch.int16).tolist() == [
        [b - 0x10000 if b & 0x8000 else b for b in SCALE_BITS_FP16]
    ]
    assert [int(c) & 0xF for c in q.codes[0]] == NIBBLES
    t = to_compressed_tensors(q)
    assert t["weight_packed"].tolist() == [PACKED]
    assert t["weight_scale"].dtype == torch.float16
    # every group's peak decodes exactly; the whole tensor via fake_quantize too
    deq = dequantize(q)
    assert deq[0, [1, 7, 8]].tolist() == [-2.0, -3.0, 1.0]
    assert torch.equal(deq, fake_quantize(x, FR_G4))
    assert deq[0, 4] == 2.625  # 7 * 0.375: +3 clips (the price of the extra level)


def test_all_levels_used_and_peak_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    q = quantize(x, QuantFormat(INT4, PerGroup(64), scale_rule="full_range"))
    assert set(q.codes.unique().tolist()) == set(range(-8, 8))
    blocks = x.reshape(64, 4, 64)
    idx = blocks.abs().argmax(-1, keepdim=True)
    peak = blocks.gather(-1, idx)
    assert torch.equal(dequantize(q).reshape(64, 4, 64).gather(-1, idx), peak)
    assert torch.equal(
        q.codes.reshape(64, 4, 64).gather(-1, idx), torch.full_like(idx, -8).to(torch.int8)
    )
    assert torch.equal(q.scale, peak[..., 0] / -8)
    assert bool((q.scale < 0).any()) and bool((q.scale > 0).any())


@pytest.mark.parametrize("element", [INT2, INT4, INT8])
def test_full_range_beats_amax_rule_on_gaussian_weights(element: object) -> None:
    x = torch.randn(128, 512, generator=torch.Generator().manual_seed(1))
    gran = PerGroup(64)
    amax = fake_quantize(x, QuantFormat(element, gran))  # type: ignore[arg-type]
    full = fake_quantize(x, QuantFormat(element, gran, scale_rule="full_range"))  # type: ignore[arg-type]
    assert (full - x).pow(2).sum() < (amax - x).pow(2).sum()


def test_mse_clip_composes_and_never_loses() -> None:
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    plain = QuantFormat(INT4, PerGroup(64), scale_rule="full_range")
    mse = QuantFormat(INT4, PerGroup(64), scale_rule="full_range", clip="mse")
    err_plain = (fake_quantize(x, plain) - x).pow(2).reshape(32, 4, 64).sum(-1)
    err_mse = (fake_quantize(x, mse) - x).pow(2).reshape(32, 4, 64).sum(-1)
    assert bool((err_mse <= err_plain).all()) and float(err_mse.sum()) < float(err_plain.sum())


def test_matches_onnx_runtime_symmetric_block_quantizer() -> None:
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n, block = 512, 48, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    kb = k // block
    packed = np.zeros((n, kb, block // 2), np.uint8)
    zp = np.zeros((n, (kb + 1) // 2), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    quantize_matmul_4bits(packed, w.numpy().T.copy(), scales, zp, block, n, k, True)
    q = quantize(w, QuantFormat(INT4, PerGroup(block), scale_rule="full_range"))
    assert np.array_equal(q.scale.numpy().view(np.int32), scales.view(np.int32))
    u = np.stack([packed & 0xF, packed >> 4], -1).reshape(n, k).astype(np.int32)
    assert np.array_equal(q.codes.numpy().astype(np.int32) + 8, u)


@pytest.mark.parametrize("scale_format", ["fp16", "fp32", "bf16"])
@pytest.mark.parametrize("gran", [PerGroup(64), PerChannel()])
def test_compressed_tensors_decompresses_negative_scales(scale_format: str, gran: object) -> None:
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(4)) * 0.05
    w[5, :64] = 0.0
    fmt = QuantFormat(INT4, gran, scale_format=scale_format, scale_rule="full_range")  # type: ignore[arg-type]
    q = quantize(w, fmt)
    assert bool((q.scale < 0).any())
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**ct_weight_args(fmt)))
    theirs = PackedQuantizationCompressor.decompress(to_compressed_tensors(q), scheme)["weight"]
    ours = dequantize(q)
    assert torch.equal(ours.to(theirs.dtype), theirs)
    back = from_compressed_tensors(to_compressed_tensors(q), fmt)
    assert torch.equal(dequantize(back), ours)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"element": MXINT8}, "unrestricted"),
        ({"element": INT4, "symmetric": False}, "symmetric"),
        ({"element": INT4, "scale_format": "e4m3"}, "signed scales"),
        ({"element": INT4, "scale_format": "e8m0"}, "signed scales"),
    ],
)
def test_invalid_combinations_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantFormat(granularity=PerGroup(32), scale_rule="full_range", **kwargs)  # type: ignore[arg-type]
