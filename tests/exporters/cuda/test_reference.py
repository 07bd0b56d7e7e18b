"""CPU reference ops: compressed-tensors layouts, emulation parity, op registration."""

from __future__ import annotations

import pytest
import torch

from ptq.exporters.cuda import ops as cuda_ops  # noqa: F401  (declares torch.ops.ptq.*)
from ptq.exporters.cuda import reference as ref
from ptq.exporters.cuda.linear import QLinear, qlinear
from ptq.exporters.cuda.packing import PackedWeight, pack_int4_codes, pack_qtensor, pack_zero_points
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

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")

NVFP4 = QuantFormat(FP4_E2M1, PerGroup(16), scale_format="e4m3", global_scale=True)
MXFP4 = QuantFormat(FP4_E2M1, PerGroup(32), scale_format="e8m0", scale_rule="mx")


def test_int4_packing_matches_compressed_tensors() -> None:
    torch.manual_seed(0)
    q = torch.randint(-8, 8, (12, 64), dtype=torch.int8)
    ours = pack_int4_codes(q.long() + 8)
    assert torch.equal(ours, ct_helpers.pack_to_int32(q, 4))
    assert torch.equal(ref.unpack_int4(ours) - 8, q.long())
    zp = torch.randint(-8, 8, (13, 4), dtype=torch.int8)  # N not a multiple of 8
    ours_zp = pack_zero_points(zp.long() + 8)
    assert torch.equal(ours_zp, ct_helpers.pack_to_int32(zp, 4, packed_dim=0))
    assert torch.equal(ref.unpack_zero_points(ours_zp, 13) - 8, zp.long())


def test_int4_golden_word() -> None:
    # q = [-8, -7, 0, 7, 1, 2, 3, 4] -> u = [0, 1, 8, 15, 9, 10, 11, 12], low nibble first:
    # 0xCBA9F810 read from the top nibble down.
    u = torch.tensor([[0, 1, 8, 15, 9, 10, 11, 12]])
    assert pack_int4_codes(u).item() == 0xCBA9F810 - 2**32


def test_fp4_golden_byte() -> None:
    # even k = 0b0111 (6.0) in the low nibble, odd k = 0b1001 (-0.5) in the high: 0x97
    packed = torch.tensor([[0x97]], dtype=torch.uint8)
    assert ref.unpack_fp4(packed).tolist() == [[0x7, 0x9]]
    w = ref.dequantize_mxfp4(
        torch.full((1, 16), 0x97, dtype=torch.uint8), torch.tensor([[127]], dtype=torch.uint8)
    )
    assert w[0, :2].tolist() == [6.0, -0.5]


FORMATS = {
    "int4_g128": QuantFormat(INT4, PerGroup(128)),
    "int4_g64_asym": QuantFormat(INT4, PerGroup(64), symmetric=False),
    "nvfp4": NVFP4,
    "mxfp4": MXFP4,
    "int8": QuantFormat(INT8, PerChannel()),
    "fp8": QuantFormat(FP8_E4M3, PerChannel()),
}


def _call(p: PackedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    ptq_ops = torch.ops.ptq
    if p.format == "int4":
        return ptq_ops.qlinear_int4(
            x, p.weight, p.weight_scale, p.weight_zero_point, p.group_size, bias
        )
    if p.format == "nvfp4":
        return ptq_ops.qlinear_nvfp4(x, p.weight, p.weight_scale, p.weight_global_scale, bias)
    if p.format == "mxfp4":
        return ptq_ops.qlinear_mxfp4(x, p.weight, p.weight_scale, bias)
    return ptq_ops.qlinear_per_channel(x, p.weight, p.weight_scale, bias)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_reference_op_matches_emulation(name: str) -> None:
    torch.manual_seed(1)
    w = torch.randn(48, 256) * 0.05
    q = quantize(w, FORMATS[name])
    p = pack_qtensor(q, scale_dtype=torch.float32)
    w_emulated = dequantize(q)
    x = torch.randn(2, 3, 256)
    bias = torch.randn(48)
    y = _call(p, x, bias)
    assert y.shape == (2, 3, 48) and y.dtype == x.dtype
    torch.testing.assert_close(y, x @ w_emulated.t() + bias, rtol=1e-5, atol=1e-5)
    y16 = _call(p, x.to(torch.bfloat16), None)
    assert y16.dtype == torch.bfloat16


def test_w4a8_and_w8a8_reference() -> None:
    torch.manual_seed(2)
    w = torch.randn(32, 128) * 0.05
    x = torch.randn(5, 128)
    x_q, x_scale = ref.quantize_fp8_per_token(x)
    assert x_q.dtype == torch.float8_e4m3fn and x_scale.shape == (5, 1)
    x_deq = x_q.float() * x_scale
    assert (x_deq - x).abs().max() < 0.07 * x.abs().max()
    for fmt, name in (
        (QuantFormat(INT4, PerGroup(32)), "int4"),
        (NVFP4, "nvfp4"),
        (MXFP4, "mxfp4"),
    ):
        q = quantize(w, fmt)
        p = pack_qtensor(q, scale_dtype=torch.float32)
        y = torch.ops.ptq.qlinear_w4a8(
            x_q,
            x_scale,
            p.weight,
            p.weight_scale,
            p.weight_zero_point,
            p.weight_global_scale,
            name,
            p.group_size,
            torch.bfloat16,
            None,
        )
        want = (x_deq @ dequantize(q).t()).to(torch.bfloat16)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, want)
    q8 = quantize(w, QuantFormat(FP8_E4M3, PerChannel()))
    p8 = pack_qtensor(q8, scale_dtype=torch.float32)
    y8 = torch.ops.ptq.qlinear_fp8_w8a8(
        x_q, x_scale, p8.weight, p8.weight_scale, torch.float16, None
    )
    torch.testing.assert_close(y8, (x_deq @ dequantize(q8).t()).half())


def test_bad_inputs_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="weight_packed"):
        ref.unpack_int4(torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="groups"):
        ref.dequantize_int4(torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, 3), None, 16)
    with pytest.raises(ValueError, match="no CUDA kernel"):
        pack_qtensor(quantize(torch.randn(4, 32), QuantFormat(INT4, PerChannel())))
    with pytest.raises(ValueError, match="weight_format"):
        torch.ops.ptq.qlinear_w4a8(
            torch.zeros(1, 32, dtype=torch.float8_e4m3fn),
            torch.ones(1, 1),
            torch.zeros(4, 16, dtype=torch.uint8),
            torch.ones(4, 1),
            None,
            None,
            "int2",
            32,
            torch.float16,
            None,
        )


def _op_cases() -> dict[str, tuple[object, tuple[object, ...]]]:
    """Every torch.ops.ptq op with valid CPU arguments (N = 16 outputs, K = 64)."""
    torch.manual_seed(3)
    w, x = torch.randn(16, 64), torch.randn(3, 64)
    x_q, x_s = ref.quantize_fp8_per_token(x)
    int4 = pack_qtensor(quantize(w, QuantFormat(INT4, PerGroup(32))))
    nv = pack_qtensor(quantize(w, NVFP4))
    mx = pack_qtensor(quantize(w, MXFP4))
    i8 = pack_qtensor(quantize(w, QuantFormat(INT8, PerChannel())), scale_dtype=torch.float32)
    f8 = pack_qtensor(quantize(w, QuantFormat(FP8_E4M3, PerChannel())), scale_dtype=torch.float32)
    ops = torch.ops.ptq
    return {
        "int4": (ops.qlinear_int4.default, (x, int4.weight, int4.weight_scale, None, 32, None)),
        "nvfp4": (
            ops.qlinear_nvfp4.default,
            (x, nv.weight, nv.weight_scale, nv.weight_global_scale, None),
        ),
        "mxfp4": (ops.qlinear_mxfp4.default, (x, mx.weight, mx.weight_scale, None)),
        "per_channel": (ops.qlinear_per_channel.default, (x, i8.weight, i8.weight_scale, None)),
        "w4a8": (
            ops.qlinear_w4a8.default,
            (
                x_q,
                x_s,
                nv.weight,
                nv.weight_scale,
                None,
                nv.weight_global_scale,
                "nvfp4",
                16,
                torch.bfloat16,
                None,
            ),
        ),
        "fp8_w8a8": (
            ops.qlinear_fp8_w8a8.default,
            (x_q, x_s, f8.weight, f8.weight_scale, torch.float16, None),
        ),
    }


@pytest.mark.parametrize("name", ["int4", "nvfp4", "mxfp4", "per_channel", "w4a8", "fp8_w8a8"])
def test_opcheck_schema_and_fake(name: str) -> None:
    op, args = _op_cases()[name]
    # SchemaCheckMode compares float8 inputs with an op CPU float8 lacks: schema-check
    # only the ops without float8 arguments.
    has_fp8 = any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)
    checks = ("test_faketensor",) if has_fp8 else ("test_schema", "test_faketensor")
    torch.library.opcheck(op, args, test_utils=checks)
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = op(*args)
    assert fake.shape == real.shape == (3, 16) and fake.dtype == real.dtype


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_qlinear_module_routes_every_format(name: str) -> None:
    torch.manual_seed(4)
    w = torch.randn(40, 128) * 0.05
    q = quantize(w, FORMATS[name])
    bias = torch.randn(40)
    layer = QLinear(pack_qtensor(q, scale_dtype=torch.float32), bias)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ dequantize(q).t() + bias, rtol=1e-5, atol=1e-5)
    if name != "int8":
        y8 = qlinear(x, layer.packed(), bias, fp8_act=True)
        x_q, x_s = ref.quantize_fp8_per_token(x)
        want = (x_q.float() * x_s) @ dequantize(q).t() + bias
        torch.testing.assert_close(y8, want, rtol=1e-5, atol=1e-5)
