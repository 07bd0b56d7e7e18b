"""CUDA kernels against the reference on a GPU (deselected by default: ``-m gpu``)."""

from __future__ import annotations

import pytest
import torch

from ptq.exporters.cuda import quantize_fp8_per_token
from ptq.exporters.cuda.packing import pack_qtensor
from ptq.exporters.cuda.reference import (
    dequantize_bitstream,
    dequantize_int4,
    dequantize_nvfp4,
)
from ptq.formats import (
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    INT3,
    INT4,
    INT5,
    INT6,
    PerGroup,
    QuantFormat,
    quantize,
)

pytestmark = pytest.mark.gpu


@pytest.fixture
def device() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


@pytest.mark.parametrize("m", [1, 7, 16, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int4_kernel_matches_reference(device: torch.device, m: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    p = pack_qtensor(
        quantize(torch.randn(264, 1024, device=device) * 0.02, QuantFormat(INT4, PerGroup(128)))
    )
    x = torch.randn(m, 1024, device=device, dtype=dtype)
    y = torch.ops.ptq.qlinear_int4(x, p.weight, p.weight_scale, None, 128, None)
    w = dequantize_int4(p.weight, p.weight_scale, None, 128)
    want = x.float() @ w.t()
    assert y.dtype == dtype
    assert ((y.float() - want).abs().max() / want.abs().max()).item() < 2e-2


@pytest.mark.parametrize("m", [1, 48])
def test_nvfp4_w4a8_kernel_matches_reference(device: torch.device, m: int) -> None:
    torch.manual_seed(1)
    fmt = QuantFormat(FP4_E2M1, PerGroup(16), scale_format="e4m3", global_scale=True)
    p = pack_qtensor(quantize(torch.randn(256, 512, device=device), fmt))
    x_q, x_s = quantize_fp8_per_token(torch.randn(m, 512, device=device))
    y = torch.ops.ptq.qlinear_w4a8(
        x_q,
        x_s,
        p.weight,
        p.weight_scale,
        None,
        p.weight_global_scale,
        "nvfp4",
        16,
        torch.bfloat16,
        None,
    )
    w = dequantize_nvfp4(p.weight, p.weight_scale, p.weight_global_scale)
    want = (x_q.float() * x_s) @ w.t()
    assert ((y.float() - want).abs().max() / want.abs().max()).item() < 2e-2


BITSTREAM = {
    "int3_g64": QuantFormat(INT3, PerGroup(64), scale_format="fp16"),
    "int3_g128_asym": QuantFormat(INT3, PerGroup(128), symmetric=False, scale_format="fp16"),
    "int5_g32_asym": QuantFormat(INT5, PerGroup(32), symmetric=False, scale_format="fp16"),
    "int5_g128_fp32": QuantFormat(INT5, PerGroup(128)),
    "int6_g64_asym_bf16": QuantFormat(INT6, PerGroup(64), symmetric=False, scale_format="bf16"),
    "int6_g32": QuantFormat(INT6, PerGroup(32), scale_format="fp16"),
    "mxfp6_e2m3": QuantFormat(FP6_E2M3, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
    "mxfp6_e3m2": QuantFormat(FP6_E3M2, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
}


@pytest.mark.parametrize("name", sorted(BITSTREAM))
@pytest.mark.parametrize("m", [1, 3, 8, 12])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_bitstream_gemv_matches_reference(
    device: torch.device, name: str, m: int, dtype: torch.dtype
) -> None:
    torch.manual_seed(2)
    n, k = 266, 1056  # odd row pairs; K = 33 chunks of 32, not a multiple of 128
    fmt = BITSTREAM[name]
    gran = fmt.granularity
    assert isinstance(gran, PerGroup)
    k = k - k % gran.size
    p = pack_qtensor(quantize(torch.randn(n, k, device=device) * 0.02, fmt))
    x = torch.randn(m, k, device=device, dtype=dtype)
    bias = torch.randn(n, device=device, dtype=dtype)
    y = torch.ops.ptq.qlinear_bitstream(
        x, p.weight, p.weight_scale, p.weight_zero_point, p.format, p.group_size, bias
    )
    w = dequantize_bitstream(
        p.weight, p.weight_scale, p.weight_zero_point, p.format, p.group_size, k
    )
    want = x.float() @ w.t() + bias.float()
    assert y.dtype == dtype and y.shape == (m, n)
    assert ((y.float() - want).abs().max() / want.abs().max()).item() < 1e-2
