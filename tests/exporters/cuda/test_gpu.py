"""CUDA kernels against the reference on a GPU (deselected by default: ``-m gpu``)."""

from __future__ import annotations

import pytest
import torch

from ptq.exporters.cuda import quantize_fp8_per_token
from ptq.exporters.cuda.packing import pack_qtensor
from ptq.exporters.cuda.reference import dequantize_int4, dequantize_nvfp4
from ptq.formats import FP4_E2M1, INT4, PerGroup, QuantFormat, quantize

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
