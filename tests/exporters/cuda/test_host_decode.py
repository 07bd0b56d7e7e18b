"""The kernels' __host__ __device__ decoders and format traits, run on the CPU via g++.

Exhaustive over every FP4, E4M3 and E8M0 code, every fp16/bf16 bit pattern and every INT4
nibble position; the traits' dequantization of whole packed matrices must equal
ptq.formats.dequantize.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from ptq.exporters.cuda.packing import PackedWeight, pack_qtensor
from ptq.formats import (
    FP4_E2M1,
    FP8_E4M3,
    INT4,
    INT8,
    PerChannel,
    PerGroup,
    QuantFormat,
    dequantize,
    quantize,
)
from ptq.formats.minifloat import decode_float


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


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _host_dequantize(harness: ctypes.CDLL, p: PackedWeight) -> torch.Tensor:
    n = p.weight.shape[0]
    k = p.weight.shape[1] * {"int4": 8, "nvfp4": 2, "mxfp4": 2}.get(p.format, 1)
    wformat = {"int4": 0, "nvfp4": 2, "mxfp4": 3, "int8": 4, "fp8": 5}[p.format]
    if p.format == "int4" and p.weight_zero_point is not None:
        wformat = 1
    scale, row_scale, kind = p.weight_scale.contiguous(), None, 0
    if p.format == "int4":
        kind = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[scale.dtype]
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
