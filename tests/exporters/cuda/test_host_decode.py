"""The kernels' __host__ __device__ decoders and format traits, run on the CPU via g++.

Exhaustive over every FP4, FP6, E4M3 and E8M0 code, every fp16/bf16 bit pattern, every
INT4 nibble position and every b-bit code at every position of a 32-code bit-stream
chunk; the traits' dequantization of whole packed matrices must equal
ptq.formats.dequantize.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from ptq.exporters.cuda.launch import WFORMAT_CODES
from ptq.exporters.cuda.packing import PackedWeight, pack_qtensor
from ptq.formats import (
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E4M3,
    INT3,
    INT4,
    INT5,
    INT6,
    INT8,
    PerChannel,
    PerGroup,
    QuantFormat,
    dequantize,
    quantize,
)
from ptq.formats.minifloat import decode_float
from ptq.formats.packing import pack_bits


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (
        a == b and math.copysign(1, a) == math.copysign(1, b)
    )


def test_fp16_and_bf16_bits_all_codes(harness: ctypes.CDLL) -> None:
    codes = torch.arange(2**16, dtype=torch.int32).to(torch.int16)
    want_h = codes.view(torch.float16).float().tolist()
    want_b = codes.view(torch.bfloat16).float().tolist()
    for c in range(2**16):
        assert _same(harness.h_half_bits_to_float(c), want_h[c]), hex(c)
        assert _same(harness.h_bf16_bits_to_float(c), want_b[c]), hex(c)


def test_e2m1_all_16_codes(harness: ctypes.CDLL) -> None:
    # bit 3 sign, bits 2..0 index {0, .5, 1, 1.5, 2, 3, 4, 6}: 0b0111 = 6, 0b1001 = -0.5
    golden = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    emulated = decode_float(torch.arange(16), FP4_E2M1).tolist()
    for c in range(16):
        got = harness.h_e2m1_to_float(c)
        assert _same(got, emulated[c]), c
        assert got == (-1 if c & 8 else 1) * golden[c & 7]


def test_e4m3_all_256_codes(harness: ctypes.CDLL) -> None:
    emulated = decode_float(torch.arange(256), FP8_E4M3).tolist()
    torch_values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().tolist()
    for c in range(256):
        got = harness.h_e4m3_to_float(c)
        assert _same(got, emulated[c]), hex(c)
        assert _same(got, torch_values[c]), hex(c)
    assert harness.h_e4m3_to_float(0x7E) == 448.0  # S.1111.110 = max finite
    assert harness.h_e4m3_to_float(0x01) == 2.0**-9  # smallest subnormal
    assert math.isnan(harness.h_e4m3_to_float(0xFF))


def test_e8m0_all_256_codes(harness: ctypes.CDLL) -> None:
    for c in range(255):
        assert harness.h_e8m0_to_float(c) == math.ldexp(1.0, c - 127), c
    assert math.isnan(harness.h_e8m0_to_float(255))


def test_int4_every_nibble_position(harness: ctypes.CDLL) -> None:
    for u in range(16):
        for i in range(8):
            # nibble i = u, the other nibbles a fixed non-zero pattern
            word = (0xA5C396E1 & ~(0xF << (4 * i))) | (u << (4 * i))
            assert harness.h_int4_value(word, i, 8.0) == u - 8
            for z in (0, 3, 15):
                assert harness.h_int4_value(word, i, float(z)) == u - z


@pytest.mark.parametrize(("fmt", "top"), [(FP6_E2M3, 7.5), (FP6_E3M2, 28.0)], ids=["e2m3", "e3m2"])
def test_fp6_all_64_codes(harness: ctypes.CDLL, fmt: object, top: float) -> None:
    decode = harness.h_fp6_e2m3_to_float if fmt == FP6_E2M3 else harness.h_fp6_e3m2_to_float
    emulated = decode_float(torch.arange(64), fmt).tolist()  # type: ignore[arg-type]
    for c in range(64):
        assert _same(decode(c), emulated[c]), c
    assert decode(0x1F) == top and decode(0x3F) == -top  # S.11.111 / S.111.11
    assert decode(0x01) == (0.125 if fmt == FP6_E2M3 else 0.0625)  # smallest subnormal
    assert math.copysign(1, decode(0x20)) == -1.0  # -0


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_bits_code_every_value_at_every_position(harness: ctypes.CDLL, bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    background = torch.randint(0, 2**bits, (1, 32), generator=g)
    for i in range(32):
        for u in range(2**bits):
            codes = background.clone()
            codes[0, i] = u
            words = pack_bits(codes, bits).view(torch.int32).contiguous()
            assert words.numel() == bits  # 32 codes are exactly b words
            assert harness.h_bits_code(words.data_ptr(), bits, i) == u, (i, u)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _host_dequantize(harness: ctypes.CDLL, p: PackedWeight, k: int | None = None) -> torch.Tensor:
    n = p.weight.shape[0]
    k = k or p.weight.shape[1] * {"int4": 8, "nvfp4": 2, "mxfp4": 2}.get(p.format, 1)
    wformat = WFORMAT_CODES[p.format]
    if p.format in ("int4", "int3", "int5", "int6") and p.weight_zero_point is not None:
        wformat = WFORMAT_CODES[f"{p.format}_asym"]
    scale, row_scale, kind = p.weight_scale.contiguous(), None, 0
    if p.format not in ("nvfp4", "mxfp4", "int8", "fp8"):
        kind = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3}[scale.dtype]
    if p.format in ("int8", "fp8"):
        scale, row_scale = None, p.weight_scale.float().reshape(-1).contiguous()
    out = torch.empty(n, k)
    rc = harness.h_dequantize(
        wformat,
        kind,
        _ptr(p.weight.contiguous()),
        _ptr(scale),
        _ptr(p.weight_zero_point),
        _ptr(p.weight_global_scale),
        _ptr(row_scale),
        n,
        k,
        p.group_size,
        out.data_ptr(),
    )
    assert rc == 0
    return out


FORMATS = {
    "int4_g128": QuantFormat(INT4, PerGroup(128)),
    "int4_g32_asym": QuantFormat(INT4, PerGroup(32), symmetric=False),
    "int4_g64_fp16_scale": QuantFormat(INT4, PerGroup(64), scale_format="fp16"),
    "nvfp4": QuantFormat(FP4_E2M1, PerGroup(16), scale_format="e4m3", global_scale=True),
    "mxfp4": QuantFormat(FP4_E2M1, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
    "int8_channel": QuantFormat(INT8, PerChannel()),
    "fp8_channel": QuantFormat(FP8_E4M3, PerChannel()),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_traits_dequantize_like_emulation(
    harness: ctypes.CDLL, name: str, scale_dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    fmt = FORMATS[name]
    w = torch.randn(24, 256) * torch.rand(24, 1) * 0.1  # 24 rows: zero points span 3 words
    q = quantize(w, fmt)
    if scale_dtype != torch.float32:
        # Emulate the checkpoint's scale dtype so both sides see the same scales.
        q.scale = (
            q.scale.to(scale_dtype).float() if name.startswith(("int4", "int8", "fp8")) else q.scale
        )
    packed = pack_qtensor(q, scale_dtype=scale_dtype)
    got = _host_dequantize(harness, packed)
    want = dequantize(q)
    if name == "nvfp4":  # kernel: (q * t) / g, emulation: q * (t / g): one rounding apart
        torch.testing.assert_close(got, want, rtol=2**-23, atol=0.0)
    else:
        assert torch.equal(got, want)


BITSTREAM_FORMATS = {
    "int3_g64": QuantFormat(INT3, PerGroup(64), scale_format="fp16"),
    "int3_g32_asym": QuantFormat(INT3, PerGroup(32), symmetric=False, scale_format="fp16"),
    "int3_g128_asym_e8m0": QuantFormat(INT3, PerGroup(128), symmetric=False, scale_format="e8m0"),
    "int5_g32": QuantFormat(INT5, PerGroup(32)),
    "int5_g64_asym_bf16": QuantFormat(INT5, PerGroup(64), symmetric=False, scale_format="bf16"),
    "int5_g128_full_range": QuantFormat(INT5, PerGroup(128), scale_rule="full_range"),
    "int6_g128": QuantFormat(INT6, PerGroup(128), scale_format="fp16"),
    "int6_g32_asym": QuantFormat(INT6, PerGroup(32), symmetric=False, scale_format="fp16"),
    "int6_g64_bf16": QuantFormat(INT6, PerGroup(64), scale_format="bf16"),
    "mxfp6_e2m3": QuantFormat(FP6_E2M3, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
    "mxfp6_e3m2": QuantFormat(FP6_E3M2, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
    "fp6_e2m3_g64_fp32": QuantFormat(FP6_E2M3, PerGroup(64)),
    "fp6_e3m2_g128_fp16": QuantFormat(FP6_E3M2, PerGroup(128), scale_format="fp16"),
}


@pytest.mark.parametrize("name", sorted(BITSTREAM_FORMATS))
def test_bitstream_traits_dequantize_like_emulation(harness: ctypes.CDLL, name: str) -> None:
    torch.manual_seed(5)
    w = torch.randn(24, 384) * torch.rand(24, 1) * 0.1  # 384 = 3 * 128: 12 chunks per row
    w[0, :32] = 0.0  # an all-zero chunk (asymmetric: zero point at the range's edge)
    q = quantize(w, BITSTREAM_FORMATS[name])
    packed = pack_qtensor(q)
    assert packed.weight.dtype == torch.uint8
    got = _host_dequantize(harness, packed, k=384)
    assert torch.equal(got, dequantize(q))
