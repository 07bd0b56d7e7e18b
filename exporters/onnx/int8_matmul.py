"""W8A8 as integer matrix products: ``MatMulInteger`` with per-token scales.

For a layer with symmetric INT8 activations (codes ``q_x``, scale ``s_t`` per token or
per tensor) and integer weights of <= 8 bits with one scale ``s_n`` per output row
(per-channel or per-tensor, no zero point), the emulation computes
``y_tn = sum_k (q_x[t,k] s_t)(q_w[n,k] s_n)``, which factors exactly as

    y_tn = s_t * s_n * sum_k q_x[t,k] q_w[n,k]

with the sum an exact int32 (``K * 128^2 < 2^31`` for ``K < 131072``). The graph is
``QuantizeLinear -> MatMulInteger -> Cast -> Mul(s_t * s_n)``, which ONNX Runtime fuses
into one ``MatMulIntegerToFloat`` kernel: an integer GEMM on the 8-bit weights instead
of dequantizing them on every call (the QDQ form, which ORT does not fuse for per-token
scales). Per token, ``QuantizeLinear`` is blocked along the last axis with a single
block of ``K`` (opset 21), so ``x`` keeps its shape [..., K].

Symmetric codes in unsigned containers: ``QuantizeLinear`` writes ``u = q_x + 128``
(uint8, zero point 128, so ``u - 128 = q_x`` exactly: the scheme stays symmetric; we do
not use ``DynamicQuantizeLinear``, whose per-tensor asymmetric uint8 scale is a
different quantizer), and the weights are stored as ``q_w + 128`` with zero point 128.
Both operands unsigned select ORT's u8u8 kernel; its u8s8 kernel on AVX2 (without
VNNI) sums pairs of products in saturating int16 (``vpmaddubsw``) and is not exact,
and its s8s8 path is slow there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from onnx import TensorProto

from ptq.exporters.onnx.builder import GraphBuilder
from ptq.formats import IntFormat
from ptq.qlinear import QuantLinear

ZERO_POINT = 128


def integer_eligible(m: QuantLinear) -> bool:
    """Whether ``m`` lowers exactly to ``MatMulInteger`` (see the module docstring)."""
    act, q = m.activation, m.qweight
    if act is None or not act.symmetric:
        return False
    if not (isinstance(act.element, IntFormat) and act.element.bits == 8 and act.element.signed):
        return False
    el = q.fmt.element
    if not (isinstance(el, IntFormat) and el.signed and el.bits <= 8) or q.zero_point is not None:
        return False
    rows, cols = q.shape
    return q.fmt.granularity.block_shape(rows, cols)[1] >= cols


def _weight(m: QuantLinear) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``q_w + 128`` as ``[K, N]`` and the fp32 per-row scales ``[N]``."""
    q = m.qweight
    r = q.fmt.granularity.block_shape(*q.shape)[0]
    scale = q.effective_scale().float()[:, 0].repeat_interleave(r)[: q.shape[0]]
    u = q.codes.to(torch.int16).numpy() + ZERO_POINT
    return np.ascontiguousarray(u.astype(np.uint8).T), scale.numpy().astype(np.float32)


def _quantized_input(b: GraphBuilder, x: str, m: QuantLinear, layer: str) -> tuple[str, str]:
    """``(u, s)``: uint8 codes ``q_x + 128`` of ``x`` [..., K] and their scale.

    Per token the scale is ``[..., 1]`` and ``QuantizeLinear`` runs blocked along the last
    axis with one block of ``K`` (opset 21), so no reshapes are needed; per tensor (dynamic
    or static) it is a scalar. Memoised: q/k/v (gate/up) quantize their input once.
    """
    act = m.activation
    assert act is not None
    key = ("u8", x, act.granularity, str(act.dynamic), layer if not act.dynamic else "")
    scale_key = (*key, "scale")
    if key in b.memo:
        return b.memo[key], b.memo[scale_key]
    zp: str = b.const(ZERO_POINT, np.uint8)
    attrs: dict[str, Any] = {}
    if not act.dynamic:
        if m.input_scale is None:
            raise ValueError(f"{layer}: static activation quantization has no input_scale")
        value = np.float32(m.input_scale.detach().float().reshape(()).item())
        scale = b.initializer(f"{layer}.input_scale", value)
    else:
        token = act.granularity == "token"
        absx = b.op("Abs", [x], name=f"{layer}/act_abs")
        axes = [b.const([-1])] if token else []
        amax = b.op("ReduceMax", [absx, *axes], keepdims=int(token), name=f"{layer}/act_amax")
        qmax = b.const(act.element.max_value, np.float32)
        raw = b.op("Div", [amax, qmax], name=f"{layer}/act_scale_raw")
        pos = b.op("Greater", [raw, b.const(0.0, np.float32)], name=f"{layer}/act_pos")
        scale = b.op("Where", [pos, raw, b.const(1.0, np.float32)], name=f"{layer}/act_scale")
        if token:
            shape = b.op("Shape", [scale], name=f"{layer}/act_zp_shape")
            zp = b.op("Expand", [zp, shape], name=f"{layer}/act_zp")
            attrs = {"axis": -1, "block_size": m.in_features}
    u = b.op("QuantizeLinear", [x, scale, zp], name=f"{layer}/act_q", **attrs)
    b.memo[key], b.memo[scale_key] = u, scale
    return u, scale


def emit_int8_matmul(b: GraphBuilder, x: str, m: QuantLinear, layer: str) -> str:
    """Append ``y = fq_act(x) @ dequantize(W)^T`` as integer ops; returns ``y`` [..., N]."""
    u, s_x = _quantized_input(b, x, m, layer)
    w_u8, w_scale = _weight(m)
    zp = b.const(ZERO_POINT, np.uint8)
    acc = b.op(
        "MatMulInteger",
        [u, b.initializer(f"{layer}.weight_u8", w_u8), zp, zp],
        name=f"{layer}/matmul_integer",
    )
    y = b.op("Cast", [acc], to=TensorProto.FLOAT, name=f"{layer}/acc_float")
    w_s = b.initializer(f"{layer}.weight_scale", w_scale)
    s_tn = b.op("Mul", [s_x, w_s], name=f"{layer}/scale_outer")  # s_t * s_n: [..., N]
    return b.op("Mul", [y, s_tn], name=f"{layer}/rescale")
