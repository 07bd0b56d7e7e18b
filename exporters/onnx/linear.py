"""Lower one Linear (floating point or ptq ``QuantLinear``) to ONNX nodes.

``y = fq_act(x) @ W^T + b [+ (x @ V^T) @ U^T]`` becomes:

* FP: ``MatMul(x, W^T)``.
* Weight-only INT: ``MatMulNBits`` (or ``DequantizeLinear`` + ``MatMul``), see
  :mod:`ptq.exporters.onnx.weights`.
* W8A8 INT8 / FP8: ``x`` is flattened to ``[M, K]`` and quantized per token with
  ``s_t = max(|x_t|) / q_max`` (``1`` where that is 0), ``QuantizeLinear`` /
  ``DequantizeLinear`` with ``axis = 0`` (round half to even, saturating: the
  emulation's grid), then ``MatMul`` with the dequantized weight. A static per-tensor
  scale uses the calibrated ``input_scale`` instead.
* LoRC (ZeroQuant-V2): two extra ``MatMul`` on the unquantized input, added to ``y``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from onnx import TensorProto
from torch import nn

from ptq.exporters.onnx.builder import MS_DOMAIN, GraphBuilder
from ptq.exporters.onnx.weights import FP8_TYPES, to_dequantize_linear, to_matmulnbits
from ptq.formats import FloatFormat, IntFormat
from ptq.qlinear import QuantLinear
from ptq.scheme import ActivationScheme

WeightOp = Literal["matmulnbits", "dq"]
WEIGHT_OPS: tuple[WeightOp, ...] = ("matmulnbits", "dq")


@dataclass(frozen=True, kw_only=True)
class LinearOptions:
    """How quantized linears are lowered.

    Args:
        weight_op: ``matmulnbits`` (ORT contrib op, fast on CPU) or ``dq`` (portable
            opset-21 blocked ``DequantizeLinear``) for weight-only integer layers.
        accuracy_level: ``MatMulNBits`` compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16,
            4 int8 activations (quantized per block by the runtime; fastest on CPU).
    """

    weight_op: WeightOp = "matmulnbits"
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        if self.weight_op not in WEIGHT_OPS:
            raise ValueError(f"unknown weight_op {self.weight_op!r}; valid: {WEIGHT_OPS}")
        if self.accuracy_level not in range(5):
            raise ValueError(f"accuracy_level must be 0-4, got {self.accuracy_level}")


def _act_type(act: ActivationScheme, layer: str) -> int:
    el = act.element
    if isinstance(el, IntFormat) and el.bits == 8:
        return TensorProto.INT8 if el.signed else TensorProto.UINT8
    if isinstance(el, FloatFormat) and el.name in FP8_TYPES:
        return FP8_TYPES[el.name]
    raise ValueError(f"{layer}: activation element {el.name} has no ONNX QuantizeLinear type")


def emit_activation_quant(
    b: GraphBuilder, x: str, act: ActivationScheme, input_scale: np.ndarray | None, layer: str
) -> str:
    """Quantize-dequantize ``x`` [..., K] as the emulation does; returns ``[M, K]``."""
    if not act.symmetric:
        raise ValueError(f"{layer}: asymmetric activations are not exported to ONNX yet")
    qtype = _act_type(act, layer)
    shape = b.op("Shape", [x], name=f"{layer}/act_shape")
    last = b.op("Slice", [shape, b.const([-1]), b.const([2**62])], name=f"{layer}/act_k")
    x2 = b.op("Reshape", [x, b.op("Concat", [b.const([-1]), last], axis=0)], name=f"{layer}/act_2d")
    qmax = np.float32(act.element.max_value)
    if not act.dynamic:
        if input_scale is None:
            raise ValueError(f"{layer}: static activation quantization has no input_scale")
        scale = b.initializer(f"{layer}.input_scale", np.float32(input_scale.reshape(())))
        axis_attrs: dict[str, Any] = {}
    else:
        absx = b.op("Abs", [x2], name=f"{layer}/act_abs")
        if act.granularity == "token":
            amax = b.op("ReduceMax", [absx, b.const([1])], keepdims=0, name=f"{layer}/act_amax")
            axis_attrs = {"axis": 0}
        else:
            amax = b.op("ReduceMax", [absx], keepdims=0, name=f"{layer}/act_amax")
            axis_attrs = {}
        raw = b.op("Div", [amax, b.const(qmax, np.float32)], name=f"{layer}/act_scale_raw")
        pos = b.op("Greater", [raw, b.const(0.0, np.float32)], name=f"{layer}/act_pos")
        scale = b.op("Where", [pos, raw, b.const(1.0, np.float32)], name=f"{layer}/act_scale")
    q_attrs: dict[str, Any] = {**axis_attrs, "output_dtype": qtype}
    if qtype in FP8_TYPES.values():
        q_attrs["saturate"] = 1
    xq = b.op("QuantizeLinear", [x2, scale], name=f"{layer}/act_q", **q_attrs)
    return b.op("DequantizeLinear", [xq, scale], name=f"{layer}/act_dq", **axis_attrs)


def _restore_shape(b: GraphBuilder, y2: str, x: str, n: int, layer: str) -> str:
    shape = b.op("Shape", [x], name=f"{layer}/in_shape")
    lead = b.op("Slice", [shape, b.const([0]), b.const([-1])], name=f"{layer}/lead")
    out_shape = b.op("Concat", [lead, b.const([n])], axis=0, name=f"{layer}/out_shape")
    return b.op("Reshape", [y2, out_shape], name=f"{layer}/unflat")


def _emit_dq_weight(b: GraphBuilder, m: QuantLinear, layer: str) -> str:
    w = to_dequantize_linear(m.qweight, layer)
    if w.onnx_type in (TensorProto.INT4, TensorProto.UINT4):
        codes = b.int4_initializer(f"{layer}.weight_q", w.codes, w.onnx_type == TensorProto.INT4)
    elif w.onnx_type in (TensorProto.INT8, TensorProto.UINT8):
        dtype = np.int8 if w.onnx_type == TensorProto.INT8 else np.uint8
        codes = b.initializer(f"{layer}.weight_q", w.codes.astype(dtype))
    else:
        codes = b.raw_initializer(f"{layer}.weight_q", w.onnx_type, w.codes.shape, w.codes)
    inputs = [codes, b.initializer(f"{layer}.weight_scale", w.scale.astype(np.float32))]
    if w.zero_point is not None:
        if w.onnx_type in (TensorProto.INT4, TensorProto.UINT4):
            zp = b.int4_initializer(
                f"{layer}.weight_zp", w.zero_point, w.onnx_type == TensorProto.INT4
            )
        else:
            dtype = np.int8 if w.onnx_type == TensorProto.INT8 else np.uint8
            zp = b.initializer(f"{layer}.weight_zp", w.zero_point.astype(dtype))
        inputs.append(zp)
    attrs: dict[str, Any] = (
        {"axis": 1} if w.block_size == 0 else {"axis": 0, "block_size": w.block_size}
    )
    return b.op("DequantizeLinear", inputs, name=f"{layer}/weight_dq", **attrs)


def emit_linear(b: GraphBuilder, x: str, module: Any, layer: str, opts: LinearOptions) -> str:
    """Append the nodes of ``module`` applied to ``x`` [..., K]; returns ``y`` [..., N].

    Raises:
        ValueError: The module or its format has no ONNX lowering (names the layer).
    """
    if isinstance(module, QuantLinear):
        y = _emit_quant(b, x, module, layer, opts)
        if module.lorc_u is not None and module.lorc_v is not None:
            v_t = module.lorc_v.detach().float().numpy().T
            u_t = module.lorc_u.detach().float().numpy().T
            h = b.op("MatMul", [x, b.initializer(f"{layer}.lorc_v_t", v_t)], name=f"{layer}/lorc_v")
            c = b.op("MatMul", [h, b.initializer(f"{layer}.lorc_u_t", u_t)], name=f"{layer}/lorc_u")
            y = b.op("Add", [y, c], name=f"{layer}/lorc_add")
    elif isinstance(module, nn.Linear):
        w_t = module.weight.detach().float().numpy().T
        y = b.op("MatMul", [x, b.initializer(f"{layer}.weight_t", w_t)], name=f"{layer}/matmul")
    else:
        raise ValueError(f"{layer}: {type(module).__name__} is not a Linear; cannot export")
    if module.bias is not None and not _bias_fused(module, opts):
        bias = b.initializer(f"{layer}.bias", module.bias.detach().float().numpy())
        y = b.op("Add", [y, bias], name=f"{layer}/bias")
    return y


def _bias_fused(module: Any, opts: LinearOptions) -> bool:
    return (
        isinstance(module, QuantLinear)
        and module.activation is None
        and opts.weight_op == "matmulnbits"
        and isinstance(module.qweight.fmt.element, IntFormat)
    )


def _emit_quant(b: GraphBuilder, x: str, m: QuantLinear, layer: str, opts: LinearOptions) -> str:
    if m.activation is None and _bias_fused(m, opts):
        w = to_matmulnbits(m.qweight, layer)
        inputs = [
            x,
            b.initializer(f"{layer}.weight_packed", w.packed),
            b.initializer(f"{layer}.weight_scale", w.scales),
        ]
        inputs.append(
            "" if w.zero_points is None else b.initializer(f"{layer}.weight_zp", w.zero_points)
        )
        inputs.append("")  # g_idx
        if m.bias is not None:
            inputs.append(b.initializer(f"{layer}.bias", m.bias.detach().float().numpy()))
        while inputs[-1] == "":
            inputs.pop()
        return b.op(
            "MatMulNBits",
            inputs,
            domain=MS_DOMAIN,
            name=f"{layer}/matmulnbits",
            K=w.k,
            N=w.n,
            bits=w.bits,
            block_size=w.block_size,
            accuracy_level=opts.accuracy_level,
        )
    weight = _emit_dq_weight(b, m, layer)
    if m.activation is None:
        return b.op("MatMul", [x, weight], name=f"{layer}/matmul")
    static: Any = m.input_scale
    scale = None if static is None else static.detach().float().numpy()
    xq = emit_activation_quant(b, x, m.activation, scale, layer)
    y2 = b.op("MatMul", [xq, weight], name=f"{layer}/matmul")
    return _restore_shape(b, y2, x, m.out_features, layer)
