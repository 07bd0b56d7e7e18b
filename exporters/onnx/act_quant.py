"""Activation quantization as ONNX nodes: flattening, scales, and the QDQ form.

The emulation (:mod:`ptq.activation`) quantizes a layer input ``x`` [..., K] flattened
to ``[M, K]`` with a symmetric scale per token ``s_t = max(|x_t|) / q_max`` (``1`` where
that is 0), per tensor, or a calibrated static ``s``; codes are
``q = clamp(round_half_even(x / s), q_min, q_max)``. ``QuantizeLinear`` computes exactly
that (``axis = 0`` for per-token scales). Layers that read the same tensor with the same
activation scheme (q/k/v, gate/up) share one quantization: the nodes are memoised on
the :class:`~ptq.exporters.onnx.builder.GraphBuilder`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto

from ptq.exporters.onnx.builder import GraphBuilder
from ptq.exporters.onnx.weights import FP8_TYPES
from ptq.formats import FloatFormat, IntFormat
from ptq.scheme import ActivationScheme


def act_type(act: ActivationScheme, layer: str) -> int:
    """The ONNX element type of ``act``'s codes (INT8/UINT8, FP8)."""
    el = act.element
    if isinstance(el, IntFormat) and el.bits == 8:
        return TensorProto.INT8 if el.signed else TensorProto.UINT8
    if isinstance(el, FloatFormat) and el.name in FP8_TYPES:
        return FP8_TYPES[el.name]
    raise ValueError(f"{layer}: activation element {el.name} has no ONNX QuantizeLinear type")


def flatten_2d(b: GraphBuilder, x: str, layer: str) -> str:
    """``x`` [..., K] as ``[M, K]`` (memoised per input)."""
    key = ("flat", x)
    if key not in b.memo:
        shape = b.op("Shape", [x], name=f"{layer}/act_shape")
        last = b.op("Slice", [shape, b.const([-1]), b.const([2**62])], name=f"{layer}/act_k")
        new = b.op("Concat", [b.const([-1]), last], axis=0, name=f"{layer}/act_2d_shape")
        b.memo[key] = b.op("Reshape", [x, new], name=f"{layer}/act_2d")
    return b.memo[key]


def restore_shape(b: GraphBuilder, y2: str, x: str, n: int, layer: str) -> str:
    """``y2`` [M, N] back to ``x``'s leading dims: [..., N]."""
    shape = b.op("Shape", [x], name=f"{layer}/in_shape")
    lead = b.op("Slice", [shape, b.const([0]), b.const([-1])], name=f"{layer}/lead")
    out_shape = b.op("Concat", [lead, b.const([n])], axis=0, name=f"{layer}/out_shape")
    return b.op("Reshape", [y2, out_shape], name=f"{layer}/unflat")


def act_scale(
    b: GraphBuilder,
    x2: str,
    act: ActivationScheme,
    input_scale: np.ndarray | None,
    layer: str,
) -> tuple[str, dict[str, Any]]:
    """The scale of ``x2`` [M, K] (``[M]`` per token, else a scalar) and its axis attrs.

    Raises:
        ValueError: Asymmetric activations, or a static scheme without a scale.
    """
    if not act.symmetric:
        raise ValueError(f"{layer}: asymmetric activations are not exported to ONNX yet")
    if not act.dynamic:
        if input_scale is None:
            raise ValueError(f"{layer}: static activation quantization has no input_scale")
        return b.initializer(f"{layer}.input_scale", np.float32(input_scale.reshape(()))), {}
    key = ("scale", x2, act.granularity, act.element.name)
    token = act.granularity == "token"
    if key not in b.memo:
        absx = b.op("Abs", [x2], name=f"{layer}/act_abs")
        axes = [b.const([1])] if token else []
        amax = b.op("ReduceMax", [absx, *axes], keepdims=0, name=f"{layer}/act_amax")
        qmax = b.const(act.element.max_value, np.float32)
        raw = b.op("Div", [amax, qmax], name=f"{layer}/act_scale_raw")
        pos = b.op("Greater", [raw, b.const(0.0, np.float32)], name=f"{layer}/act_pos")
        one = b.const(1.0, np.float32)
        b.memo[key] = b.op("Where", [pos, raw, one], name=f"{layer}/act_scale")
    return b.memo[key], ({"axis": 0} if token else {})


def emit_activation_qdq(
    b: GraphBuilder, x: str, act: ActivationScheme, input_scale: np.ndarray | None, layer: str
) -> str:
    """Quantize-dequantize ``x`` [..., K] as the emulation does; returns ``[M, K]``."""
    qtype = act_type(act, layer)
    x2 = flatten_2d(b, x, layer)
    scale, axis_attrs = act_scale(b, x2, act, input_scale, layer)
    key = ("qdq", x2, scale)
    if key not in b.memo:
        q_attrs: dict[str, Any] = {**axis_attrs, "output_dtype": qtype}
        if qtype in FP8_TYPES.values():
            q_attrs["saturate"] = 1
        xq = b.op("QuantizeLinear", [x2, scale], name=f"{layer}/act_q", **q_attrs)
        b.memo[key] = b.op("DequantizeLinear", [xq, scale], name=f"{layer}/act_dq", **axis_attrs)
    return b.memo[key]
