"""Lower one Linear (floating point or ptq ``QuantLinear``) to ONNX nodes.

``y = fq_act(x) @ W^T + b [+ (x @ V^T) @ U^T]`` becomes:

* FP: ``MatMul(x, W^T)``.
* Weight-only INT: ``MatMulNBits`` (or ``DequantizeLinear`` + ``MatMul``), see
  :mod:`ptq.exporters.onnx.weights`.
* W8A8 INT8 with per-channel (or per-tensor) INT weights: ``MatMulInteger`` on 8-bit
  codes with per-token scales applied to the int32 result
  (:mod:`ptq.exporters.onnx.int8_matmul`; ``int8_matmul="integer"``, the default).
* Other activation-quantized layers (FP8, group-wise weights, or
  ``int8_matmul="qdq"``): ``x`` is flattened to ``[M, K]``, quantize-dequantized per
  token (:mod:`ptq.exporters.onnx.act_quant`), then ``MatMul`` with the dequantized
  weight (portable QDQ; ORT does not fuse it for per-token scales, so it is slow).
* LoRC (ZeroQuant-V2): two extra ``MatMul`` on the unquantized input, added to ``y``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from onnx import TensorProto
from torch import nn

from ptq.exporters.onnx.act_quant import emit_activation_qdq, restore_shape
from ptq.exporters.onnx.builder import MS_DOMAIN, GraphBuilder
from ptq.exporters.onnx.int8_matmul import emit_int8_matmul, integer_eligible
from ptq.exporters.onnx.weights import to_dequantize_linear, to_matmulnbits
from ptq.formats import IntFormat
from ptq.qlinear import QuantLinear

WeightOp = Literal["matmulnbits", "dq"]
WEIGHT_OPS: tuple[WeightOp, ...] = ("matmulnbits", "dq")
Int8Matmul = Literal["integer", "qdq"]
INT8_MATMULS: tuple[Int8Matmul, ...] = ("integer", "qdq")


@dataclass(frozen=True, kw_only=True)
class LinearOptions:
    """How quantized linears are lowered.

    Args:
        weight_op: ``matmulnbits`` (ORT contrib op, fast on CPU) or ``dq`` (portable
            opset-21 blocked ``DequantizeLinear``) for weight-only integer layers.
        accuracy_level: ``MatMulNBits`` compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16,
            4 int8 activations (quantized per block by the runtime; fastest on CPU).
        int8_matmul: INT8-activation layers with per-channel INT weights: ``integer``
            (``MatMulInteger``, fast) or ``qdq`` (QuantizeLinear/DequantizeLinear +
            float ``MatMul``, portable but slow in ORT).
    """

    weight_op: WeightOp = "matmulnbits"
    accuracy_level: int = 4
    int8_matmul: Int8Matmul = "integer"

    def __post_init__(self) -> None:
        if self.weight_op not in WEIGHT_OPS:
            raise ValueError(f"unknown weight_op {self.weight_op!r}; valid: {WEIGHT_OPS}")
        if self.int8_matmul not in INT8_MATMULS:
            raise ValueError(f"unknown int8_matmul {self.int8_matmul!r}; valid: {INT8_MATMULS}")
        if self.accuracy_level not in range(5):
            raise ValueError(f"accuracy_level must be 0-4, got {self.accuracy_level}")


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
    # ORT 1.32 fuses MatMulInteger -> Cast -> Mul -> Add(bias) into MatMulIntegerToFloat
    # and then adds the bias wrongly when the activation scale is per token (off by up to
    # |bias|); Sum is the same addition and is left alone by that fusion.
    add = "Sum" if _integer_path(module, opts) else "Add"
    if isinstance(module, QuantLinear):
        y = _emit_quant(b, x, module, layer, opts)
        if module.lorc_u is not None and module.lorc_v is not None:
            v_t = module.lorc_v.detach().float().numpy().T
            u_t = module.lorc_u.detach().float().numpy().T
            h = b.op("MatMul", [x, b.initializer(f"{layer}.lorc_v_t", v_t)], name=f"{layer}/lorc_v")
            c = b.op("MatMul", [h, b.initializer(f"{layer}.lorc_u_t", u_t)], name=f"{layer}/lorc_u")
            y = b.op(add, [y, c], name=f"{layer}/lorc_add")
    elif isinstance(module, nn.Linear):
        w_t = module.weight.detach().float().numpy().T
        y = b.op("MatMul", [x, b.initializer(f"{layer}.weight_t", w_t)], name=f"{layer}/matmul")
    else:
        raise ValueError(f"{layer}: {type(module).__name__} is not a Linear; cannot export")
    if module.bias is not None and not _bias_fused(module, opts):
        bias = b.initializer(f"{layer}.bias", module.bias.detach().float().numpy())
        y = b.op(add, [y, bias], name=f"{layer}/bias")
    return y


def _integer_path(module: Any, opts: LinearOptions) -> bool:
    return (
        isinstance(module, QuantLinear)
        and opts.int8_matmul == "integer"
        and integer_eligible(module)
    )


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
    if _integer_path(m, opts):
        return emit_int8_matmul(b, x, m, layer)
    weight = _emit_dq_weight(b, m, layer)
    if m.activation is None:
        return b.op("MatMul", [x, weight], name=f"{layer}/matmul")
    static: Any = m.input_scale
    scale = None if static is None else static.detach().float().numpy()
    xq = emit_activation_qdq(b, x, m.activation, scale, layer)
    y2 = b.op("MatMul", [xq, weight], name=f"{layer}/matmul")
    return restore_shape(b, y2, x, m.out_features, layer)
