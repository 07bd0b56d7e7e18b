"""Build the ONNX graph of a Llama-family decoder LM from its (emulated) PyTorch model.

Per block, with ``x`` the residual stream [B, S, H]:

    h = x + o_proj(Attn(RoPE(q_proj(n1)), RoPE(k_proj(n1)), v_proj(n1))),  n1 = RMSNorm(x)
    x' = h + down_proj(silu(gate_proj(n2)) * up_proj(n2)),                  n2 = RMSNorm(h)

``RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)`` (Zhang & Sennrich 2019); RoPE (Su et al.
2021) ``x * cos + rotate_half(x) * sin`` with cos/sin caches taken from the model's own
rotary module; attention ``softmax(q k^T / sqrt(D) + mask) v`` with GQA done by viewing
the query heads as ``[B, KV, G, S, D]`` against keys ``[B, KV, 1, T, D]`` (no copies)
and a causal (optionally sliding-window) mask over absolute positions
``past_len .. past_len + S - 1``. With ``kv_cache`` the graph takes
``past_key_values.{i}.key/value`` [B, KV, P, D] and returns ``present.{i}.key/value``
[B, KV, P + S, D]; positions start at ``P``. Batches must not be padded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch import nn

from ptq.exporters.onnx.block_names import BlockNames, llama_blocks
from ptq.exporters.onnx.builder import GraphBuilder
from ptq.exporters.onnx.linear import LinearOptions, emit_linear
from ptq.exporters.onnx.spec import DecoderSpec, decoder_spec
from ptq.frontend.structure import ModelStructure

NEG = float(np.finfo(np.float32).min)


def _rotary_module(model: nn.Module) -> Any:
    """The module computing the RoPE tables (the one holding an ``inv_freq`` buffer)."""
    for _name, module in model.named_modules():
        if "inv_freq" in dict(module.named_buffers(recurse=False)):
            return module
    raise ValueError("no rotary embedding module (with an inv_freq buffer) found")


def _rope_caches(model: Any, spec: DecoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_positions, D] from the model's rotary module (any static RoPE type)."""
    rotary = _rotary_module(model)
    pos = torch.arange(spec.max_positions).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(probe, pos)
    return cos[0].float().numpy(), sin[0].float().numpy()


def _rms_norm(b: GraphBuilder, x: str, norm: Any, eps: float, name: str) -> str:
    sq = b.op("Mul", [x, x], name=f"{name}/sq")
    var = b.op("ReduceMean", [sq, b.const([-1])], keepdims=1, name=f"{name}/var")
    std = b.op(
        "Sqrt",
        [b.op("Add", [var, b.const(eps, np.float32)], name=f"{name}/eps")],
        name=f"{name}/std",
    )
    y = b.op("Div", [x, std], name=f"{name}/norm")
    w = b.initializer(f"{name}.weight", norm.weight.detach().float().numpy())
    return b.op("Mul", [y, w], name=f"{name}/scale")


def _heads(b: GraphBuilder, x: str, n: int, d: int, name: str) -> str:
    """[B, S, n*d] -> [B, n, S, d]."""
    r = b.op("Reshape", [x, b.const([0, 0, n, d])], name=f"{name}/split_heads")
    return b.op("Transpose", [r], perm=[0, 2, 1, 3], name=f"{name}/bnsd")


def _rope(b: GraphBuilder, x: str, cos: str, sin: str, d: int, name: str) -> str:
    x1, x2 = b.op_multi(
        "Split", [x, b.const([d // 2, d // 2])], n_out=2, axis=-1, name=f"{name}/halves"
    )
    rot = b.op(
        "Concat", [b.op("Neg", [x2], name=f"{name}/neg"), x1], axis=-1, name=f"{name}/rotate_half"
    )
    a = b.op("Mul", [x, cos], name=f"{name}/cos")
    return b.op("Add", [a, b.op("Mul", [rot, sin], name=f"{name}/sin")], name=f"{name}/rope")


def _attention(
    b: GraphBuilder,
    model: nn.Module,
    names: BlockNames,
    x: str,
    ctx: dict[str, str],
    spec: DecoderSpec,
    opts: LinearOptions,
    i: int,
    kv_cache: bool,
) -> str:
    p = names.o.rpartition(".")[0] or f"block{i}"
    d, kv, g = spec.head_dim, spec.num_kv_heads, spec.groups

    def linear(name: str, inp: str) -> str:
        return emit_linear(b, inp, model.get_submodule(name), name, opts)

    q = _heads(b, linear(names.q, x), spec.num_heads, d, p + ".q")
    k = _heads(b, linear(names.k, x), kv, d, p + ".k")
    v = _heads(b, linear(names.v, x), kv, d, p + ".v")
    q = _rope(b, q, ctx["cos"], ctx["sin"], d, p + ".q")
    k = _rope(b, k, ctx["cos"], ctx["sin"], d, p + ".k")
    if kv_cache:
        k = b.op("Concat", [f"past_key_values.{i}.key", k], axis=2, name=f"{p}/cat_k")
        v = b.op("Concat", [f"past_key_values.{i}.value", v], axis=2, name=f"{p}/cat_v")
        b.add_output(k, f"present.{i}.key", TensorProto.FLOAT, ["batch", kv, "total", d])
        b.add_output(v, f"present.{i}.value", TensorProto.FLOAT, ["batch", kv, "total", d])
    q5 = b.op("Reshape", [q, b.const([0, kv, g, -1, d])], name=f"{p}/q_groups")
    k5 = b.op("Unsqueeze", [k, b.const([2])], name=f"{p}/k_groups")
    v5 = b.op("Unsqueeze", [v, b.const([2])], name=f"{p}/v_groups")
    k_t = b.op("Transpose", [k5], perm=[0, 1, 2, 4, 3], name=f"{p}/k_t")
    scores = b.op("MatMul", [q5, k_t], name=f"{p}/scores")
    scores = b.op("Mul", [scores, b.const(d**-0.5, np.float32)], name=f"{p}/scaled")
    probs = b.op(
        "Softmax",
        [b.op("Add", [scores, ctx["mask"]], name=f"{p}/masked")],
        axis=-1,
        name=f"{p}/softmax",
    )
    o = b.op("MatMul", [probs, v5], name=f"{p}/context")  # [B, KV, G, S, D]
    o = b.op("Reshape", [o, b.const([0, spec.num_heads, -1, d])], name=f"{p}/merge_groups")
    o = b.op("Transpose", [o], perm=[0, 2, 1, 3], name=f"{p}/bsnd")
    o = b.op("Reshape", [o, b.const([0, 0, spec.num_heads * d])], name=f"{p}/merge_heads")
    return linear(names.o, o)


def _mlp(b: GraphBuilder, model: nn.Module, names: BlockNames, x: str, opts: LinearOptions) -> str:
    p = names.down.rpartition(".")[0] or names.down

    def linear(name: str, inp: str) -> str:
        return emit_linear(b, inp, model.get_submodule(name), name, opts)

    gate = linear(names.gate, x)
    up = linear(names.up, x)
    act = b.op("Mul", [gate, b.op("Sigmoid", [gate], name=f"{p}/sigmoid")], name=f"{p}/silu")
    return linear(names.down, b.op("Mul", [act, up], name=f"{p}/glu"))


def _positions_and_mask(b: GraphBuilder, spec: DecoderSpec, kv_cache: bool) -> dict[str, str]:
    seq = b.op("Gather", [b.op("Shape", ["input_ids"]), b.const(1)], name="seq_len")
    if kv_cache:
        past = b.op(
            "Gather", [b.op("Shape", ["past_key_values.0.key"]), b.const(2)], name="past_len"
        )
    else:
        past = b.const(0)
    total = b.op("Add", [past, seq], name="total_len")
    q_pos = b.op("Range", [past, total, b.const(1)], name="q_pos")
    k_pos = b.op("Range", [b.const(0), total, b.const(1)], name="k_pos")
    diff = b.op("Sub", [b.op("Unsqueeze", [q_pos, b.const([1])]), k_pos], name="q_minus_k")
    allowed = b.op("GreaterOrEqual", [diff, b.const(0)], name="causal")
    if spec.sliding_window is not None:
        inside = b.op("Less", [diff, b.const(spec.sliding_window)], name="window")
        allowed = b.op("And", [allowed, inside], name="causal_window")
    mask = b.op("Where", [allowed, b.const(0.0, np.float32), b.const(NEG, np.float32)], name="mask")
    return {"mask": mask, "pos": q_pos}


def _structure(model: nn.Module) -> ModelStructure:
    from ptq.frontend.analyse import model_structure
    from ptq.frontend.capture import capture

    return model_structure(model, capture(model))


def build_decoder(
    model: Any,
    opts: LinearOptions,
    *,
    kv_cache: bool = True,
    structure: ModelStructure | None = None,
) -> onnx.ModelProto:
    """The ONNX model of ``model`` (inputs ``input_ids`` [B, S] int64, output ``logits``).

    Module names come from ``model``'s structure (captured now when not given,
    :mod:`ptq.exporters.onnx.block_names`).

    Raises:
        ValueError: Unsupported architecture or layer format (the message names it).
    """
    spec = decoder_spec(model.config)
    names = llama_blocks(structure if structure is not None else _structure(model))
    b = GraphBuilder(name=f"ptq_{spec.model_type}")
    b.add_input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    if kv_cache:
        for i in range(spec.num_layers):
            for kind in ("key", "value"):
                b.add_input(
                    f"past_key_values.{i}.{kind}",
                    TensorProto.FLOAT,
                    ["batch", spec.num_kv_heads, "past", spec.head_dim],
                )
    ctx = _positions_and_mask(b, spec, kv_cache)
    cos_np, sin_np = _rope_caches(model, spec)
    ctx["cos"] = b.op("Gather", [b.initializer("rope.cos", cos_np), ctx["pos"]], name="cos")
    ctx["sin"] = b.op("Gather", [b.initializer("rope.sin", sin_np), ctx["pos"]], name="sin")
    embed_mod = model.get_submodule(names.embed)
    embed = embed_mod.weight.detach().float().numpy()
    embed_name = b.initializer(f"{names.embed}.weight", embed)
    x = b.op("Gather", [embed_name, "input_ids"], name="embed")
    for i, bn in enumerate(names.blocks):
        block = bn.input_norm.rpartition(".")[0]
        n1 = _rms_norm(b, x, model.get_submodule(bn.input_norm), spec.rms_norm_eps, bn.input_norm)
        x = b.op(
            "Add",
            [x, _attention(b, model, bn, n1, ctx, spec, opts, i, kv_cache)],
            name=f"{block}/residual1",
        )
        n2 = _rms_norm(b, x, model.get_submodule(bn.post_norm), spec.rms_norm_eps, bn.post_norm)
        x = b.op("Add", [x, _mlp(b, model, bn, n2, opts)], name=f"{block}/residual2")
    x = _rms_norm(b, x, model.get_submodule(names.final_norm), spec.rms_norm_eps, names.final_norm)
    head = model.get_submodule(names.head)
    tied = type(head) is nn.Linear and head.weight.data_ptr() == embed_mod.weight.data_ptr()
    if tied and head.bias is None:
        flat = b.op("Reshape", [x, b.const([-1, spec.hidden_size])], name="lm_head/flat")
        logits2 = b.op("Gemm", [flat, embed_name], transB=1, name="lm_head/gemm")
        lead = b.op("Slice", [b.op("Shape", [x]), b.const([0]), b.const([2])], name="lm_head/bs")
        shape = b.op("Concat", [lead, b.const([spec.vocab_size])], axis=0, name="lm_head/shape")
        logits = b.op("Reshape", [logits2, shape], name="lm_head/logits")
    else:
        logits = emit_linear(b, x, head, names.head, opts)
    b.outputs.insert(
        0,
        onnx.helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch", "sequence", spec.vocab_size]
        ),
    )
    b.nodes.append(onnx.helper.make_node("Identity", [logits], ["logits"], name="out_logits"))
    model_proto = b.to_model()
    meta = {
        "ptq.architecture": spec.model_type,
        "ptq.num_layers": str(spec.num_layers),
        "ptq.num_kv_heads": str(spec.num_kv_heads),
        "ptq.head_dim": str(spec.head_dim),
        "ptq.kv_cache": str(int(kv_cache)),
        "ptq.weight_op": opts.weight_op,
        "ptq.accuracy_level": str(opts.accuracy_level),
        "ptq.int8_matmul": opts.int8_matmul,
    }
    onnx.helper.set_model_props(model_proto, meta)
    return model_proto
