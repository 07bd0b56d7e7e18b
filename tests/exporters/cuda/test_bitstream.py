"""Bit-stream formats (INT3/5/6, FP6 E2M3/E3M2): golden packing, host decode, reference op.

The kernels read ptq's own layout (``--target ptq``): per row a little-endian bit stream
of b-bit codes (LAYOUT.md). Golden patterns are derived by hand in the comments.
"""

from __future__ import annotations

import pytest
import torch

from ptq.exporters.cuda import ops as cuda_ops  # noqa: F401  (declares torch.ops.ptq.*)
from ptq.exporters.cuda import reference as ref
from ptq.exporters.cuda.linear import QLinear, qlinear
from ptq.exporters.cuda.packing import bitstream_name, pack_qtensor
from ptq.formats import (
    FP6_E2M3,
    FP6_E3M2,
    INT3,
    INT4,
    INT5,
    INT6,
    PerChannel,
    PerGroup,
    QuantFormat,
    dequantize,
    quantize,
)
from ptq.formats.ptq_layout import to_ptq_layout
from ptq.formats.qformat import QTensor


def _int_qtensor(q: list[int], element: object, scale: float = 1.0) -> QTensor:
    codes = torch.tensor([q], dtype=torch.int8)
    fmt = QuantFormat(element, PerGroup(32))  # type: ignore[arg-type]
    return QTensor(codes, torch.full((1, 1), scale), fmt)


def test_golden_int3_chunk() -> None:
    # q = -4..3 repeated: u = q + 4 = 0..7, 3 bits each, first code lowest. Eight codes
    # are 24 bits, read from the top: 111 110 101 100 011 010 001 000 = octal 76543210
    # = 0xFAC688, so the bytes are 88 C6 FA, four times (96 bits = 3 whole words).
    q = _int_qtensor(list(range(-4, 4)) * 4, INT3)
    packed = pack_qtensor(q).weight
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x88, 0xC6, 0xFA] * 4]
    words = packed.view(torch.int32)  # little-endian words as the kernel reads them
    assert [w & 0xFFFFFFFF for w in words[0].tolist()] == [0x88FAC688, 0xC688FAC6, 0xFAC688FA]
    w = ref.dequantize_bitstream(packed, torch.ones(1, 1), None, "int3", 32, 32)
    assert w[0].tolist() == [float(v) for v in list(range(-4, 4)) * 4]


def test_golden_int5_code_straddles_two_words() -> None:
    # Code 6 of INT5 occupies stream bits 30..34. u = 19 = 0b10011 (q = 19 - 16 = 3): its
    # low bits 11 are bits 30, 31 of word 0 (0xC0000000), its high bits 100 bits 0..2 of
    # word 1 (4). Every other q = -16 (u = 0).
    q = [-16] * 32
    q[6] = 3
    packed = pack_qtensor(_int_qtensor(q, INT5, scale=0.5)).weight
    words = [w & 0xFFFFFFFF for w in packed.view(torch.int32)[0].tolist()]
    assert words == [0xC0000000, 4, 0, 0, 0]
    w = ref.dequantize_bitstream(packed, torch.full((1, 1), 0.5), None, "int5", 32, 32)
    assert w[0, 6].item() == 1.5 and w[0, 5].item() == -8.0


def test_golden_int6_and_zero_point() -> None:
    # Code 5 of INT6 occupies bits 30..35. u = 45 = 0b101101 (q = 13): low bits 01 at
    # bits 30, 31 of word 0 (0x40000000), high bits 1011 at bits 0..3 of word 1 (0xB).
    q = [-32] * 32
    q[5] = 13
    t = _int_qtensor(q, INT6)
    words = [w & 0xFFFFFFFF for w in pack_qtensor(t).weight.view(torch.int32)[0].tolist()]
    assert words == [0x40000000, 0xB, 0, 0, 0, 0]
    # Asymmetric: W = (q - z) * s with the int8 zero point of the group (here z = -3).
    z = torch.tensor([[-3]], dtype=torch.int8)
    w = ref.dequantize_bitstream(pack_qtensor(t).weight, torch.full((1, 1), 2.0), z, "int6", 32, 32)
    assert w[0, 5].item() == (13 + 3) * 2.0 and w[0, 0].item() == (-32 + 3) * 2.0


def test_golden_fp6_codes() -> None:
    # E2M3 (bias 1): 0b0_11_111 = 0x1F = 2^2 * 1.875 = 7.5 (max); 0b1_00_001 = 0x21 =
    # -(1/8) (smallest subnormal, negative). 6-bit stream: byte 0 = 0x1F | (0x21 & 3) << 6
    # = 0x5F, byte 1 = 0x21 >> 2 = 0x08.
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, :2] = torch.tensor([0x1F, 0x21])
    e8m0_one = torch.tensor([[127]], dtype=torch.uint8)  # 2^(127 - 127) = 1
    fmt = QuantFormat(FP6_E2M3, PerGroup(32), scale_format="e8m0", scale_rule="mx")
    packed = pack_qtensor(QTensor(codes, torch.ones(1, 1), fmt)).weight
    assert packed[0, :3].tolist() == [0x5F, 0x08, 0x00]
    w = ref.dequantize_bitstream(packed, e8m0_one, None, "fp6_e2m3", 32, 32)
    assert w[0, :3].tolist() == [7.5, -0.125, 0.0]
    # E3M2 (bias 3): 0x1F = 2^4 * 1.75 = 28 (max), 0x3F = -28, 0x01 = 2^-2 / 4 = 1/16;
    # scale code 126 = 2^-1.
    codes[0, :3] = torch.tensor([0x1F, 0x3F, 0x01])
    packed = pack_qtensor(QTensor(codes, torch.ones(1, 1), fmt)).weight
    w = ref.dequantize_bitstream(
        packed, torch.tensor([[126]], dtype=torch.uint8), None, "fp6_e3m2", 32, 32
    )
    assert w[0, :3].tolist() == [14.0, -14.0, 0.03125]


FORMATS = {
    "int3_g64_fp16": QuantFormat(INT3, PerGroup(64), scale_format="fp16"),
    "int3_g32_asym": QuantFormat(INT3, PerGroup(32), symmetric=False, scale_format="fp16"),
    "int5_g128": QuantFormat(INT5, PerGroup(128)),
    "int5_g64_asym_bf16": QuantFormat(INT5, PerGroup(64), symmetric=False, scale_format="bf16"),
    "int6_g32_fp16": QuantFormat(INT6, PerGroup(32), scale_format="fp16"),
    "int6_g128_asym": QuantFormat(INT6, PerGroup(128), symmetric=False, scale_format="fp16"),
    "int5_g64_full_range": QuantFormat(INT5, PerGroup(64), scale_rule="full_range"),
    "mxfp6_e2m3": QuantFormat(FP6_E2M3, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
    "mxfp6_e3m2": QuantFormat(FP6_E3M2, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
    "fp6_e2m3_g128_fp16": QuantFormat(FP6_E2M3, PerGroup(128), scale_format="fp16"),
    "fp6_e3m2_g64_pow2": QuantFormat(FP6_E3M2, PerGroup(64), scale_format="pow2"),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("groups", [8, 3])
def test_reference_decode_equals_emulation(name: str, groups: int) -> None:
    torch.manual_seed(0)
    gran = FORMATS[name].granularity
    assert isinstance(gran, PerGroup)
    cols = groups * gran.size
    w = torch.randn(24, cols) * torch.rand(24, 1) * 0.1
    q = quantize(w, FORMATS[name])
    p = pack_qtensor(q)
    assert torch.equal(p.weight, to_ptq_layout(q)["weight_packed"])  # the exporter's bytes
    got = ref.dequantize_bitstream(
        p.weight, p.weight_scale, p.weight_zero_point, p.format, p.group_size, cols
    )
    assert torch.equal(got, dequantize(q))


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_reference_op_matches_emulation(name: str) -> None:
    torch.manual_seed(1)
    q = quantize(torch.randn(40, 256) * 0.05, FORMATS[name])
    p = pack_qtensor(q)
    x, bias = torch.randn(2, 3, 256), torch.randn(40)
    y = torch.ops.ptq.qlinear_bitstream(
        x, p.weight, p.weight_scale, p.weight_zero_point, p.format, p.group_size, bias
    )
    assert y.shape == (2, 3, 40) and y.dtype == x.dtype
    torch.testing.assert_close(y, x @ dequantize(q).t() + bias, rtol=1e-5, atol=1e-5)
    layer = QLinear(p, bias)
    torch.testing.assert_close(layer(x), y)
    assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_opcheck_schema_and_fake() -> None:
    torch.manual_seed(3)
    p = pack_qtensor(quantize(torch.randn(16, 64), FORMATS["int5_g64_asym_bf16"]))
    args = (torch.randn(3, 64), p.weight, p.weight_scale, p.weight_zero_point, "int5", 64, None)
    op = torch.ops.ptq.qlinear_bitstream.default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_formats_without_a_bitstream_kernel() -> None:
    w = torch.randn(8, 96)
    for fmt in (
        QuantFormat(INT3, PerChannel()),
        QuantFormat(INT5, PerGroup(16)),
        QuantFormat(INT6, PerGroup(48)),
        QuantFormat(FP6_E2M3, PerGroup(32), scale_format="e4m3"),
    ):
        assert bitstream_name(fmt) is None
        with pytest.raises(ValueError, match="no CUDA kernel"):
            pack_qtensor(quantize(w, fmt))
    assert bitstream_name(QuantFormat(INT4, PerGroup(32))) is None
    assert all(bitstream_name(f) is not None for f in FORMATS.values())
    assert bitstream_name(FORMATS["mxfp6_e3m2"]) == "fp6_e3m2"
    assert bitstream_name(FORMATS["int6_g128_asym"]) == "int6"


def test_bad_bitstream_inputs_raise_value_errors() -> None:
    p = pack_qtensor(quantize(torch.randn(4, 64), FORMATS["int3_g32_asym"]))
    with pytest.raises(ValueError, match="bytes per row"):
        ref.dequantize_bitstream(p.weight, p.weight_scale, None, "int3", 32, 96)
    with pytest.raises(ValueError, match="weight_scale has shape"):
        ref.dequantize_bitstream(p.weight, p.weight_scale[:, :1], None, "int3", 32, 64)
    with pytest.raises(ValueError, match="zero points must be int8"):
        ref.dequantize_bitstream(
            p.weight, p.weight_scale, p.weight_zero_point.int(), "int3", 32, 64
        )
    with pytest.raises(ValueError, match="unknown bit-stream format"):
        ref.dequantize_bitstream(p.weight, p.weight_scale, None, "int7", 32, 64)
    with pytest.raises(ValueError, match="FP8 activations"):
        qlinear(torch.randn(1, 64), p, fp8_act=True)
