"""Bit-exactness with compressed-tensors: our packers + their decompressors."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
from compressed_tensors.compressors.naive_quantized.base import (
    IntQuantizationCompressor,
    NaiveQuantizationCompressor,
)
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

from ptq.formats import (
    FP6_E2M3,
    INT3,
    INT4,
    FloatFormat,
    PerGroup,
    QuantFormat,
    dequantize,
    preset,
    quantize,
)
from ptq.formats.ct_layout import (
    ct_format_name,
    ct_weight_args,
    from_compressed_tensors,
    to_compressed_tensors,
)

COMPRESSORS = {
    "pack-quantized": PackedQuantizationCompressor,
    "int-quantized": IntQuantizationCompressor,
    "float-quantized": NaiveQuantizationCompressor,
    "nvfp4-pack-quantized": NVFP4PackedCompressor,
    "mxfp4-pack-quantized": MXFP4PackedCompressor,
    "mxfp8-quantized": MXFP8QuantizationCompressor,
}

CASES = [
    ("nvfp4", "nvfp4-pack-quantized"),
    ("mxfp4", "mxfp4-pack-quantized"),
    ("mxfp8", "mxfp8-quantized"),
    ("int4_g128", "pack-quantized"),
    ("int4_g64", "pack-quantized"),
    ("int4_g128_asym", "pack-quantized"),
    ("int4_channel", "pack-quantized"),
    ("int2_g64", "pack-quantized"),
    ("int8_channel", "pack-quantized"),
    ("fp8_e4m3_channel", "float-quantized"),
    ("fp8_e4m3_tensor", "float-quantized"),
    ("fp8_block128", "float-quantized"),
]


def _weight(rows: int = 96, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[3, 17] = 0.9  # an outlier so block scales differ widely
    w[5, :32] = 0.0  # an all-zero block
    return w


def _scheme(args: dict[str, object]) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize(("name", "ct_format"), CASES)
def test_their_decompressor_reproduces_our_dequantize(name: str, ct_format: str) -> None:
    fmt = preset(name)
    assert ct_format_name(fmt) == ct_format
    q = quantize(_weight(rows=200 if name == "fp8_block128" else 96), fmt)
    ours = dequantize(q)
    tensors = to_compressed_tensors(q)
    out = COMPRESSORS[ct_format].decompress(dict(tensors), _scheme(ct_weight_args(fmt)))
    theirs = out["weight"]
    # Their output dtype is the scale dtype (bf16 for MX/NVFP4, fp16 for fp16 scales):
    # our fp32 result rounded once to it must match bit for bit.
    assert torch.equal(_bits(ours.to(theirs.dtype)), _bits(theirs))


@pytest.mark.parametrize(("name", "ct_format"), CASES)
def test_round_trip_through_ct_tensors(name: str, ct_format: str) -> None:
    fmt = preset(name)
    q = quantize(_weight(seed=1), fmt)
    back = from_compressed_tensors(to_compressed_tensors(q), fmt)
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(_bits(dequantize(back)), _bits(dequantize(q)))


def test_nvfp4_fp32_dequant_is_bit_identical_to_ct_dequantize() -> None:
    fmt = preset("nvfp4")
    q = quantize(_weight(seed=2), fmt)
    t = to_compressed_tensors(q)
    n, half = t["weight_packed"].shape
    values = unpack_fp4_from_uint8(t["weight_packed"], n, half * 2, dtype=torch.float32)
    theirs = ct_dequantize(
        x_q=values,
        scale=t["weight_scale"].to(torch.float32),
        args=QuantizationArgs(**ct_weight_args(fmt)),
        global_scale=t["weight_global_scale"],
        dtype=torch.float32,
    )
    assert theirs.dtype == torch.float32
    assert torch.equal(_bits(dequantize(q)), _bits(theirs))
    assert t["weight_packed"].dtype == torch.uint8 and t["weight_packed"].shape == (96, 128)
    assert t["weight_scale"].dtype == torch.float8_e4m3fn and t["weight_scale"].shape == (96, 16)
    assert t["weight_global_scale"].shape == (1,)
    # global = 448 * 6 / amax(W)
    assert float(t["weight_global_scale"]) == pytest.approx(448 * 6 / 0.9, rel=1e-6)


def test_fp32_scales_are_bit_identical_in_fp32() -> None:
    fmt = QuantFormat(INT4, PerGroup(64), symmetric=False, scale_format="fp32")
    q = quantize(_weight(seed=3), fmt)
    out = PackedQuantizationCompressor.decompress(
        to_compressed_tensors(q), _scheme(ct_weight_args(fmt))
    )
    assert out["weight"].dtype == torch.float32
    assert torch.equal(_bits(dequantize(q)), _bits(out["weight"]))


@pytest.mark.parametrize(
    "fmt",
    [
        QuantFormat(INT3, PerGroup(64)),
        QuantFormat(FP6_E2M3, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
        QuantFormat(FloatFormat(3, 0, 3), PerGroup(32)),
        preset("mxint8"),
        preset("fp4_e2m1_g32_ue5m3"),
    ],
)
def test_formats_without_ct_layout_are_refused(fmt: QuantFormat) -> None:
    assert ct_format_name(fmt) is None
    with pytest.raises(ValueError, match="ptq_layout"):
        to_compressed_tensors(quantize(_weight(), fmt))


# W8A8: symmetric INT8 weights of an activation-quantized layer use int-quantized (int8
# ``weight`` codes + ``weight_scale``), as llm-compressor writes W8A8 and vLLM reads it.
W8A8_CASES = ["int8_channel", "int8_g128"]


@pytest.mark.parametrize("name", W8A8_CASES)
def test_int8_with_activations_is_int_quantized_bit_exact(name: str) -> None:
    fmt = (
        preset(name)
        if name == "int8_channel"
        else preset("int8_channel").with_granularity(PerGroup(128))
    )
    assert ct_format_name(fmt) == "pack-quantized"
    assert ct_format_name(fmt, quantized_activations=True) == "int-quantized"
    q = quantize(_weight(), fmt)
    tensors = to_compressed_tensors(q, quantized_activations=True)
    assert set(tensors) == {"weight", "weight_scale"}
    assert tensors["weight"].dtype == torch.int8 and tensors["weight"].shape == q.shape
    out = IntQuantizationCompressor.decompress(dict(tensors), _scheme(ct_weight_args(fmt)))
    theirs = out["weight"]
    assert torch.equal(_bits(dequantize(q).to(theirs.dtype)), _bits(theirs))
    back = from_compressed_tensors(tensors, fmt)
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(_bits(dequantize(back)), _bits(dequantize(q)))


def test_int4_and_asymmetric_int8_stay_packed_with_activations() -> None:
    assert ct_format_name(preset("int4_g128"), quantized_activations=True) == "pack-quantized"
    asym = QuantFormat(preset("int8_channel").element, preset("int8_channel").granularity, False)
    assert ct_format_name(asym, quantized_activations=True) == "pack-quantized"
