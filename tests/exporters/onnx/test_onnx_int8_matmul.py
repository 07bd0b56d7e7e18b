"""W8A8 as MatMulInteger: one layer through ORT vs the emulated QuantLinear.

The integer path must be exact up to the fp32 rescaling ``acc * s_t * s_n``: relative
error <= 1e-6 of the output scale. Inputs sit at the grid's extremes (activation codes
+-127, weight codes +-127 and -128), where ORT's u8s8 AVX2 kernel would saturate its
int16 pair sums; the exported u8u8 form must not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from ptq.exporters.onnx.builder import GraphBuilder
from ptq.exporters.onnx.int8_matmul import integer_eligible
from ptq.exporters.onnx.linear import LinearOptions, emit_linear
from ptq.exporters.onnx.runtime import make_session
from ptq.formats import INT4, INT8, PerChannel, PerGroup, QuantFormat, quantize
from ptq.qlinear import QuantLinear
from ptq.scheme import ActivationScheme

K, N = 256, 48
TOKEN = ActivationScheme(element=INT8)


def _run(layer: QuantLinear, x: torch.Tensor, tmp_path: Path, **opts: object) -> np.ndarray:
    b = GraphBuilder()
    b.add_input("x", TensorProto.FLOAT, ["b", "s", K])
    y = emit_linear(b, "x", layer, "layer", LinearOptions(**opts))  # type: ignore[arg-type]
    b.add_output(y, "y", TensorProto.FLOAT, ["b", "s", N])
    path = tmp_path / "layer.onnx"
    onnx.save_model(b.to_model(), str(path))
    out: np.ndarray = make_session(path, threads=1).run(["y"], {"x": x.numpy()})[0]
    return out


def _extreme_weight(fmt: QuantFormat) -> torch.Tensor:
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02
    w[:8] = 0.5  # every code +127 (amax) / -128 (full_range, positive peak)
    w[8:16] = -0.5
    w[16, ::2] = 0.5
    w[16, 1::2] = -0.25
    return w


def _extreme_input() -> torch.Tensor:
    x = torch.randn(2, 5, K, generator=torch.Generator().manual_seed(1))
    x[0, 0] = 3.0  # every code +127
    x[0, 1] = -3.0
    x[1, 0, ::2] = 3.0
    x[1, 0, 1::2] = -0.1
    x[1, 1] = 0.0  # all-zero token: scale 1
    return x


@pytest.mark.parametrize(
    "fmt",
    [
        QuantFormat(INT8, PerChannel()),
        QuantFormat(INT8, PerChannel(), scale_rule="full_range"),
        QuantFormat(INT4, PerChannel(), scale_format="fp16"),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_integer_path_matches_emulation(tmp_path: Path, fmt: QuantFormat, bias: bool) -> None:
    q = quantize(_extreme_weight(fmt), fmt)
    b = torch.linspace(-1, 1, N) if bias else None
    layer = QuantLinear(q, b, TOKEN)
    assert integer_eligible(layer)
    x = _extreme_input()
    with torch.no_grad():
        ref = layer(x).numpy()
    out = _run(layer, x, tmp_path)
    scale = float(np.abs(ref).max())
    assert np.abs(out - ref).max() <= 1e-6 * scale, np.abs(out - ref).max() / scale
    qdq = _run(layer, x, tmp_path, int8_matmul="qdq")
    assert np.abs(qdq - ref).max() <= 1e-5 * scale


def test_static_per_tensor_scale(tmp_path: Path) -> None:
    fmt = QuantFormat(INT8, PerChannel())
    act = ActivationScheme(element=INT8, granularity="tensor", dynamic=False)
    layer = QuantLinear(quantize(_extreme_weight(fmt), fmt), None, act, torch.tensor([0.01]))
    x = _extreme_input()  # |x| up to 3 >> 127 * 0.01: codes saturate at -128 / 127
    with torch.no_grad():
        ref = layer(x).numpy()
    out = _run(layer, x, tmp_path)
    assert np.abs(out - ref).max() <= 1e-6 * float(np.abs(ref).max())


def test_group_wise_weights_fall_back_to_qdq() -> None:
    layer = QuantLinear(quantize(torch.randn(N, K), QuantFormat(INT4, PerGroup(64))), None, TOKEN)
    assert not integer_eligible(layer)
    asym = ActivationScheme(element=INT8, symmetric=False)
    layer = QuantLinear(quantize(torch.randn(N, K), QuantFormat(INT8, PerChannel())), None, asym)
    assert not integer_eligible(layer)


def test_bias_and_lorc_after_integer_matmul(tmp_path: Path) -> None:
    """Bias and LoRC terms are added after the fused kernel, not folded into it wrongly."""
    fmt = QuantFormat(INT8, PerChannel())
    layer = QuantLinear(quantize(_extreme_weight(fmt), fmt), torch.linspace(-2, 2, N), TOKEN)
    gen = torch.Generator().manual_seed(5)
    layer.set_lorc(0.1 * torch.randn(N, 4, generator=gen), 0.1 * torch.randn(4, K, generator=gen))
    x = _extreme_input()
    with torch.no_grad():
        ref = layer(x).numpy()
    out = _run(layer, x, tmp_path)
    assert np.abs(out - ref).max() <= 1e-6 * float(np.abs(ref).max())
