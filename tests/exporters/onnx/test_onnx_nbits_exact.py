"""Every MatMulNBits node of an exported GPTQ / full-range model decodes to the emulation.

The weights are read back from the written ``.onnx`` file (packed nibbles, scales,
optional zero points) and decoded as ORT defines MatMulNBits,
``W[n, k] = (u[n, k] - z[n, k // block]) * s[n, k // block]``; the result must equal the
emulated ``QuantLinear.weight`` bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ptq.api import CalibrationConfig, quantize
from ptq.exporters.onnx import export_onnx
from ptq.formats import INT4, PerGroup, QuantFormat
from ptq.passes.gptq import GPTQPass, GPTQPassConfig
from ptq.qlinear import QuantLinear
from ptq.scheme import get_scheme

FULL_RANGE = QuantFormat(INT4, PerGroup(64), scale_format="fp16", scale_rule="full_range")
AMAX = QuantFormat(INT4, PerGroup(128))


def _nibbles(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def decode_nbits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``{layer: W [N, K] fp32}`` for every 4-bit MatMulNBits node of ``model``."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        assert a["bits"] == 4
        n, k, block = a["N"], a["K"], a["block_size"]
        u = _nibbles(inits[node.input[1]]).reshape(n, -1).astype(np.float32)
        kb = u.shape[1] // block
        s = inits[node.input[2]].reshape(n, kb)
        zp = np.full((n, kb), 8.0, np.float32)
        if len(node.input) > 3 and node.input[3]:
            zp = _nibbles(inits[node.input[3]])[:, :kb].astype(np.float32)
        w = (u - np.repeat(zp, block, axis=1)) * np.repeat(s, block, axis=1)
        out[node.name.split("/")[0]] = w[:, :k]
    return out


@pytest.mark.parametrize(("act_order", "full_range"), [(True, False), (False, False), (True, True)])
def test_gptq_weights_export_bit_exactly(
    tiny_llama: Path, tmp_path: Path, act_order: bool, full_range: bool
) -> None:
    # the preset's default rule is full-range; the amax case asks for amax explicitly
    scheme = get_scheme("w4a16").with_overrides(weight=AMAX)
    if full_range:
        scheme = scheme.with_overrides(weight=FULL_RANGE)
    model: Any = quantize(
        tiny_llama,
        scheme,
        pipeline=[GPTQPass(GPTQPassConfig(act_order=act_order))],
        calibration=CalibrationConfig(samples=6, seqlen=32),
        progress=False,
        log=lambda *_: None,
    ).model
    path = export_onnx(model, tmp_path / "g.onnx")
    decoded = decode_nbits(onnx.load(str(path)))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(decoded) == set(layers) and len(layers) == 14
    negative = 0
    for name, layer in layers.items():
        ours = layer.weight.detach().numpy()
        assert np.array_equal(decoded[name].view(np.int32), ours.view(np.int32)), name
        negative += int((layer.qweight.scale < 0).sum())
    assert (negative > 0) == full_range
