"""Quantizable-op discovery: which weights feed which matmul-like ops, by graph.

An op is found from the captured graph (:mod:`ptq.frontend.capture`): every
``linear``/``mm``/``addmm``/``conv``/``embedding``/grouped-matmul node whose weight
argument traces back (through views and transposes) to a parameter; the owning module
comes from the graph's parameter names and ``nn_module_stack`` metadata, never from
module names. Every weight is reduced to the matrix ``W2 [N, K]`` that multiplies the
input, ``y = x W2^T``, with ``K`` the reduction size quantization groups run along:

* ``linear`` (``nn.Linear``): ``W [N, K]`` as stored.
* ``conv1d_hf`` (GPT-2 ``Conv1D``, ``y = x W + b``): stored ``[K, N]``, transposed.
* ``conv2d``/``conv1d``: ``[O, I/g, kh, kw] -> [O, I/g * kh * kw]`` (im2col order).
* ``embedding``: ``[V, D]`` rows (one vector per token id), ``K = D``.
* ``moe_experts``: fused 3-D expert weights ``[E, N, K]`` (transformers 5 keeps
  Mixtral-style experts as one ``nn.Parameter``) -> ``[E * N, K]``. Row-wise formats
  (per channel, per group along ``K``) give the same codes and scales whether the
  experts are stacked or not, so the stacked view is quantized as one matrix.

Weights the front end cannot quantize (a custom module using ``F.linear``, a router,
3-D convs, unreached parameters) are returned in ``skipped`` with the reason, so
``ptq plan`` shows them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn

from ptq.frontend.capture import Capture, CapturedGraph, capture
from ptq.frontend.graph_utils import (
    ATTENTION_OPS,
    CONV_OPS,
    EMBED_OPS,
    LINEAR_OPS,
    MM_OPS,
    module_path,
    op_name,
    tensor_shape,
    trace_param,
)

OpKind = Literal["linear", "conv1d_hf", "conv2d", "conv1d", "embedding", "matmul", "moe_experts"]
Source = Literal["export", "symbolic_trace", "module_walk"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (``transformers.pytorch_utils.Conv1D``): weight ``[K, N]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


@dataclass(frozen=True)
class QuantizableOp:
    """One quantizable weight and how it multiplies its input.

    Attributes:
        name: Module name in the full model (``module.param`` for fused experts).
        kind: See the module docstring.
        in_features: Reduction size ``K``.
        out_features: Output size ``N`` (per expert for ``moe_experts``).
        module: The owning module.
        param: The weight's attribute name on ``module``.
        transposed: The stored weight is ``[..., K, N]`` rather than ``[..., N, K]``.
        num_experts: ``E`` for fused experts, else 1.
        source: How it was found (``export``, ``symbolic_trace`` or ``module_walk``).
    """

    name: str
    kind: OpKind
    in_features: int
    out_features: int
    module: nn.Module | None = field(default=None, repr=False, compare=False)
    param: str = "weight"
    transposed: bool = False
    num_experts: int = 1
    source: Source = "module_walk"

    def weight(self) -> torch.Tensor:
        """The stored weight tensor."""
        if self.module is None:
            raise ValueError(f"{self.name} ({self.kind}) has no weight")
        w = getattr(self.module, self.param)
        assert isinstance(w, torch.Tensor)
        return w

    def weight_2d(self) -> torch.Tensor:
        """The weight as ``[N, K]`` (``[E * N, K]`` for experts); a view when possible."""
        w = self.weight().detach()
        if self.kind == "moe_experts":
            w = w.transpose(-2, -1) if self.transposed else w
            return w.reshape(-1, w.shape[-1])
        if self.kind in ("conv2d", "conv1d"):
            return w.reshape(w.shape[0], -1)
        return w.t() if self.transposed else w


@dataclass
class Discovery:
    """Everything :func:`discover` found.

    Attributes:
        ops: Quantizable ops by name, in model order.
        skipped: Name -> ``"not quantized: <reason>"`` for weights left in floating point.
        capture: The capture used (None when capture was not attempted).
        notes: Human-readable remarks (capture fallbacks and the like).
    """

    ops: dict[str, QuantizableOp] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    capture: Capture | None = None
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[QuantizableOp]:
        return iter(self.ops.values())

    def of_kind(self, *kinds: OpKind) -> list[QuantizableOp]:
        return [op for op in self.ops.values() if op.kind in kinds]


def _op_from_module(
    name: str, module: nn.Module, source: Source, param: str = "weight"
) -> QuantizableOp | str:
    """Classify a module owning a weight; a string is the reason it is not quantized."""
    w = getattr(module, param, None)
    if not isinstance(w, torch.Tensor):
        return f"not quantized: {type(module).__name__}.{param} is not a tensor"
    if isinstance(module, nn.Linear) and param == "weight":
        return QuantizableOp(name, "linear", w.shape[1], w.shape[0], module, source=source)
    if is_hf_conv1d(module) and param == "weight":
        return QuantizableOp(
            name, "conv1d_hf", w.shape[0], w.shape[1], module, transposed=True, source=source
        )
    if isinstance(module, nn.Conv2d | nn.Conv1d) and param == "weight":
        kind: OpKind = "conv2d" if isinstance(module, nn.Conv2d) else "conv1d"
        k = int(w[0].numel())
        return QuantizableOp(name, kind, k, w.shape[0], module, source=source)
    if isinstance(module, nn.Embedding) and param == "weight":
        return QuantizableOp(name, "embedding", w.shape[1], w.shape[0], module, source=source)
    return f"not quantized: {type(module).__name__}.{param} {tuple(w.shape)} has no quantized op"


def _expert_op(
    name: str, module: nn.Module, param: str, transposed: bool, source: Source
) -> QuantizableOp:
    w = getattr(module, param)
    e, a, b = w.shape
    k, n = (a, b) if transposed else (b, a)
    return QuantizableOp(
        f"{name}.{param}" if name else param, "moe_experts", k, n, module, param,
        transposed=transposed, num_experts=e, source=source,
    )  # fmt: skip


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}.{rel}" if prefix and rel else prefix or rel


def _graph_ops(cg: CapturedGraph) -> tuple[dict[str, QuantizableOp | str], set[str]]:
    """Ops of one captured graph, named relative to its root; plus the params they use."""
    gm, root = cg.graph_module, cg.root
    found: dict[str, QuantizableOp | str] = {}
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if any(p.dim() >= 2 for p in mod.parameters(recurse=False)):
                rel = str(node.target)
                found.setdefault(rel, _op_from_module(rel, root.get_submodule(rel), cg.method))
                used.update(f"{rel}.{p}" for p, _ in mod.named_parameters(recurse=False))
            continue
        name = op_name(node, gm)
        if name not in LINEAR_OPS | MM_OPS | CONV_OPS | EMBED_OPS:
            continue
        for pos, arg in enumerate(node.args[:3]):
            use = trace_param(arg, cg.params)
            if use is None or use.node.op not in ("placeholder", "get_attr"):
                continue
            owner_rel, _, pname = use.param.rpartition(".")
            owner = root.get_submodule(owner_rel) if owner_rel else root
            w = getattr(owner, pname)
            if not isinstance(w, torch.Tensor) or w.dim() < 2:
                continue
            here = module_path(node)  # tied weights: prefer the module that ran the op
            if here is not None and here != owner_rel:
                cand = root.get_submodule(here) if here else root
                if getattr(cand, pname, None) is w:
                    owner_rel, owner = here, cand
            used.add(use.param)
            # Right operand of a matmul is [K, N]; a linear weight (or left operand) is [N, K].
            kn = name in MM_OPS and pos == (2 if name in ("addmm", "baddbmm") else 1)
            transposed = kn != bool(use.transposes % 2)
            if w.dim() == 3 and name in MM_OPS | LINEAR_OPS:
                op = _expert_op(owner_rel, owner, pname, transposed, cg.method)
                found.setdefault(op.name, op)
                continue
            res = _op_from_module(owner_rel, owner, cg.method, pname)
            if isinstance(res, str) and not isinstance(owner, nn.Embedding | nn.Linear):
                res = (
                    f"not quantized: weight used by {name} inside {type(owner).__name__}, "
                    "which is not an nn.Linear/Conv/Embedding (no quantized replacement)"
                )
            found.setdefault(owner_rel if pname == "weight" else use.param, res)
    return found, used


def _matmul_ops(cg: CapturedGraph) -> dict[str, QuantizableOp]:
    """Activation x activation matmuls (attention scores and values)."""
    out: dict[str, QuantizableOp] = {}
    for node in cg.graph_module.graph.nodes:
        name = op_name(node, cg.graph_module)
        if name not in ATTENTION_OPS and name not in ("matmul", "bmm"):
            continue
        if any(trace_param(a, cg.params) is not None for a in node.args[:2]):
            continue
        shape = tensor_shape(node.args[0]) if node.args else None
        k = shape[-1] if shape else 0
        rel = _join(module_path(node) or "", node.name)
        out[rel] = QuantizableOp(rel, "matmul", k, 0, None, source=cg.method)
    return out


def _rename(op: QuantizableOp, new: str) -> QuantizableOp:
    fields = {f: getattr(op, f) for f in QuantizableOp.__dataclass_fields__}
    fields["name"] = new
    return QuantizableOp(**fields)


def _walk(model: nn.Module, prefix_skip: str | None) -> dict[str, QuantizableOp | str]:
    """Module-walk discovery (outer modules of block-wise capture, or capture failed)."""
    out: dict[str, QuantizableOp | str] = {}
    for name, mod in model.named_modules():
        if prefix_skip is not None and (name == prefix_skip or name.startswith(prefix_skip + ".")):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() < 2:
                continue
            n_exp = getattr(mod, "num_experts", None)
            if p.dim() == 3 and isinstance(n_exp, int) and p.shape[0] == n_exp:
                op = _expert_op(name, mod, pname, False, "module_walk")
                out[op.name] = op
                continue
            res = _op_from_module(name, mod, "module_walk", pname)
            key = name if pname == "weight" else _join(name, pname)
            if isinstance(res, str):
                res = res + "; capture did not reach it, so its use is unknown"
            out[key] = res
    return out


def discover(
    model: nn.Module,
    *,
    include_embeddings: bool = False,
    include_matmul: bool = False,
    include_experts: bool = False,
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
    captured: Capture | None = None,
) -> Discovery:
    """Find every quantizable op of ``model`` and every weight left alone (with why).

    Args:
        model: The model.
        include_embeddings: Return embeddings as ops (else listed as skipped).
        include_matmul: Also return activation x activation matmuls (no weights).
        include_experts: Return fused 3-D expert weights as ``moe_experts`` ops (else
            skipped: the Linear-only passes cannot replace them yet).
        example_inputs: Inputs for capture (default: a token batch for HF models).
        captured: A capture to reuse; if None, :func:`capture` runs (its failure falls
            back to a module walk, noted).
    """
    from ptq.frontend.experts import all_tokens

    result = Discovery()
    try:
        with all_tokens(model):
            cap = captured if captured is not None else capture(model, example_inputs)
    except Exception as exc:  # no capture at all: module walk
        cap = Capture(failures={"": [f"capture: {type(exc).__name__}: {exc}"]})
        result.notes.append(f"capture failed ({type(exc).__name__}); used a module walk")
    result.capture = cap
    raw: dict[str, QuantizableOp | str] = {}
    reps = cap.block_groups or {-1: [-1]}
    for cg in cap.graphs:
        found, used = _graph_ops(cg)
        if include_matmul:
            found.update(_matmul_ops(cg))
        for pname, p in cg.root.named_parameters():
            owner = pname.rpartition(".")[0]
            if p.dim() >= 2 and pname not in used and owner not in found:
                found[pname] = "not quantized: parameter not consumed by a linear/conv/embedding op"
        rep = int(cg.prefix.rsplit(".", 1)[1]) if cap.block_path else -1
        for idx in reps.get(rep, [rep]):
            prefix = f"{cap.block_path}.{idx}" if cap.block_path else ""
            for rel, item in found.items():
                full = _join(prefix, rel)
                raw[full] = _rename(item, full) if isinstance(item, QuantizableOp) else item
    for prefix, why in cap.failures.items():
        result.notes.append(f"capture of {prefix or 'the model'} failed: {'; '.join(why)}")
        raw.update(_walk(model.get_submodule(prefix) if prefix else model, None))
    if cap.block_path is not None:
        for name, item in _walk(model, cap.block_path).items():
            raw.setdefault(name, item)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    for name in sorted(raw, key=lambda n: order.get(n, order.get(n.rpartition(".")[0], 0))):
        item = raw[name]
        if isinstance(item, str):
            result.skipped[name] = item
        elif item.kind == "embedding" and not include_embeddings:
            result.skipped[name] = "not quantized: embedding (include_embeddings=False)"
        elif item.kind == "moe_experts" and not include_experts:
            result.skipped[name] = (
                f"not quantized: fused MoE experts {item.num_experts}x[{item.out_features}, "
                f"{item.in_features}] (3-D nn.Parameter, not nn.Linear); quantizable as "
                "[E*N, K] rows with include_experts=True once a fused-expert module exists"
            )
        else:
            result.ops[name] = item
    return result


__all__ = ["Discovery", "OpKind", "QuantizableOp", "discover", "fx", "is_hf_conv1d"]
