"""Pattern groups on the captured graph, keyed by module names.

Found on each captured graph (a decoder block or the whole model) and repeated for
every block of the same structure:

* :class:`NormLinearsGroup` -- a LayerNorm/RMSNorm (a norm module, or the inline
  ``x * rsqrt(mean(x^2) + eps) * w`` op sequence) whose output feeds several weight ops
  (q/k/v, gate/up). SmoothQuant (Xiao et al., 2022) folds ``diag(s)^-1`` into the norm
  weight and ``diag(s)`` into every linear of the group; NVFP4 shares one global scale.
* :class:`FusedProjection` -- one weight op whose output is split into parts along the
  feature axis (Phi-3 ``qkv_proj``/``gate_up_proj``, GPT-2 ``c_attn``).
* :class:`ResidualAdd` -- ``y = x + f(x)``: an add whose one input is an ancestor of the other.
* :class:`LinearActivation` -- a weight op followed by an activation (gate -> SiLU).
* :class:`ValueOutputPair` -- ``v_proj -> attention (value slot) -> o_proj``: the pair a
  per-head rotation or smoothing scale can be folded through (QuaRot, Ashkboos et al.,
  2024; the v/o rule of OmniQuant and AWQ).
* :class:`ConvBN` -- a conv whose only consumer is a batch-norm (see :mod:`ptq.frontend.fold`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from ptq.frontend.capture import Capture, CapturedGraph
from ptq.frontend.graph_utils import (
    ACTIVATION_OPS,
    ATTENTION_OPS,
    CONV_OPS,
    LINEAR_OPS,
    MM_OPS,
    PASS_THROUGH,
    as_int,
    module_path,
    op_name,
    source_through,
    tensor_shape,
    trace_param,
    users_through,
)

NORM_EXCLUDE = ("BatchNorm", "GroupNorm", "InstanceNorm")
SPLIT_OPS = frozenset({"chunk", "split", "split_with_sizes", "unbind", "tensor_split"})
SOFTMAX = frozenset({"softmax", "_softmax", "_safe_softmax"})
DROPOUT = frozenset({"dropout", "native_dropout"})


@dataclass(frozen=True)
class NormLinearsGroup:
    norm: str
    linears: tuple[str, ...]
    inline: bool = False


@dataclass(frozen=True)
class FusedProjection:
    linear: str
    parts: int


@dataclass(frozen=True)
class ResidualAdd:
    node: str
    module: str
    branch: str | None


@dataclass(frozen=True)
class LinearActivation:
    linear: str
    activation: str


@dataclass(frozen=True)
class ValueOutputPair:
    v: str
    o: str


@dataclass(frozen=True)
class ConvBN:
    conv: str
    bn: str


@dataclass
class Patterns:
    """All pattern groups of a model (full module names)."""

    norm_linears: list[NormLinearsGroup] = field(default_factory=list)
    fused: list[FusedProjection] = field(default_factory=list)
    residuals: list[ResidualAdd] = field(default_factory=list)
    linear_act: list[LinearActivation] = field(default_factory=list)
    value_output: list[ValueOutputPair] = field(default_factory=list)
    conv_bn: list[ConvBN] = field(default_factory=list)


def is_norm_module(module: nn.Module) -> bool:
    """LayerNorm/RMSNorm modules, including HF ``LlamaRMSNorm`` and friends."""
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        return True
    name = type(module).__name__
    return "Norm" in name and not any(x in name for x in NORM_EXCLUDE)


def weight_owner(node: fx.Node, cg: CapturedGraph) -> str | None:
    """Relative module name of the weight a linear/mm/conv node multiplies by, if any."""
    gm = cg.graph_module
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        ok = isinstance(mod, nn.Linear | nn.Conv1d | nn.Conv2d)
        return str(node.target) if ok else None
    if op_name(node, gm) not in LINEAR_OPS | MM_OPS | CONV_OPS:
        return None
    for arg in node.args[:3]:
        use = trace_param(arg, cg.params)
        if use is None:
            continue
        owner, _, pname = use.param.rpartition(".")
        here = module_path(node)
        if here and here != owner:  # tied weights: the module that ran the op
            w = getattr(cg.root.get_submodule(owner) if owner else cg.root, pname)
            if getattr(cg.root.get_submodule(here), pname, None) is w:
                return here
        return owner
    return None


def _norm_outputs(cg: CapturedGraph) -> dict[str, tuple[fx.Node, bool]]:
    """Norm name -> (its output node, found inline by op sequence)."""
    out: dict[str, tuple[fx.Node, bool]] = {}
    for node in cg.graph_module.graph.nodes:
        path = module_path(node)
        if path is None or node.op == "placeholder":
            continue
        try:
            mod = cg.root.get_submodule(path) if path else cg.root
        except AttributeError:
            continue
        if path and is_norm_module(mod):
            out[path] = (node, False)  # the last node of the norm's region wins
    for node in cg.graph_module.graph.nodes:
        if op_name(node) != "rsqrt" or (module_path(node) or "") in out:
            continue
        inner = source_through(node.args[0])
        if isinstance(inner, fx.Node) and op_name(inner) == "add":
            inner = inner.args[0]
        if not (isinstance(inner, fx.Node) and op_name(inner) == "mean"):
            continue
        scaled = [u for u in node.users if op_name(u) == "mul"]
        if not scaled:
            continue
        last = scaled[0]
        for user in users_through(last):
            if op_name(user) == "mul" and any(trace_param(a, cg.params) for a in user.args):
                last = user
        name = module_path(node) or node.name
        out[name] = (last, True)
    return out


def _fused_parts(node: fx.Node) -> int:
    """Number of feature-axis parts a weight op's output is split into (0 if not split)."""
    shape = tensor_shape(node)
    frontier, parts = [node], 0
    while frontier:
        cur = frontier.pop()
        for user in cur.users:
            name = op_name(user)
            same_width = shape is not None and (tensor_shape(user) or (0,))[-1] == shape[-1]
            if name in ("view", "reshape", "to", "_to_copy") and same_width:
                frontier.append(user)
            elif name in SPLIT_OPS:
                parts += max(len(user.users), 1)
            elif name == "slice" and shape is not None and len(user.args) > 1:
                dim = as_int(user.args[1])
                parts += int(dim % len(shape) == len(shape) - 1)
    return parts if parts >= 2 else 0


def _ancestor(a: fx.Node, b: fx.Node, limit: int = 4000) -> bool:
    """True if ``a`` is an ancestor of ``b``."""
    todo, seen = [b], set[fx.Node]()
    while todo and len(seen) < limit:
        cur = todo.pop()
        for arg in cur.all_input_nodes:
            if arg is a:
                return True
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return False


def _nearest_weight_op(
    node: fx.Node, cg: CapturedGraph, limit: int = 200
) -> tuple[str, fx.Node] | None:
    """The closest weight op above ``node`` (breadth first): its module and node."""
    todo, seen = [node], set[fx.Node]()
    while todo and len(seen) < limit:
        cur = todo.pop(0)
        owner = weight_owner(cur, cg)
        if owner is not None:
            return owner, cur
        for arg in cur.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                todo.append(arg)
    return None


def _value_targets(start: fx.Node, cg: CapturedGraph) -> set[str]:
    """Weight ops reached from ``start`` through an attention op's value slot only."""
    found: set[str] = set()
    todo: list[tuple[fx.Node, bool]] = [(start, False)]
    seen: set[tuple[fx.Node, bool]] = set()
    while todo:
        cur, crossed = todo.pop()
        for user in cur.users:
            name = op_name(user, cg.graph_module)
            nxt = crossed
            if name in ATTENTION_OPS:
                if len(user.args) < 3 or user.args[2] is not cur:
                    continue
                nxt = True
            elif name in ("matmul", "bmm") and not crossed:
                src = source_through(user.args[0], PASS_THROUGH | DROPOUT)
                if user.args[1] is not cur or op_name(src) not in SOFTMAX:  # type: ignore[arg-type]
                    continue
                nxt = True
            owner = weight_owner(user, cg)
            if owner is not None:
                if nxt:
                    found.add(owner)
                continue
            if (user, nxt) not in seen:
                seen.add((user, nxt))
                todo.append((user, nxt))
    return found


def _activation_of(node: fx.Node, cg: CapturedGraph) -> str | None:
    for user in users_through(node, PASS_THROUGH | SPLIT_OPS):
        name = op_name(user, cg.graph_module)
        if name in ACTIVATION_OPS:
            return name
        path = module_path(user)
        if path:
            mod = cg.root.get_submodule(path)
            cls = type(mod).__name__
            if cls.endswith("Activation") or type(mod).__module__ == "torch.nn.modules.activation":
                return cls
    return None


def graph_patterns(cg: CapturedGraph) -> Patterns:
    """Patterns of one captured graph, names relative to its root."""
    gm, pats = cg.graph_module, Patterns()
    owners = {n: o for n in gm.graph.nodes if (o := weight_owner(n, cg)) is not None}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for norm, (out, inline) in _norm_outputs(cg).items():
        fed = [owners[u] for u in sorted(users_through(out), key=order.__getitem__) if u in owners]
        if fed:
            pats.norm_linears.append(NormLinearsGroup(norm, tuple(dict.fromkeys(fed)), inline))
    for node, owner in owners.items():
        if (parts := _fused_parts(node)) and not isinstance(
            cg.root.get_submodule(owner), nn.Conv2d
        ):
            pats.fused.append(FusedProjection(owner, parts))
        if (act := _activation_of(node, cg)) is not None:
            pats.linear_act.append(LinearActivation(owner, act))
        pats.value_output += [ValueOutputPair(owner, o) for o in sorted(_value_targets(node, cg))]
        bn_users = list(node.users)
        if op_name(node, gm) in CONV_OPS | {"Conv2d"} and len(bn_users) == 1:
            bn = bn_users[0]
            bn_mod = gm.get_submodule(str(bn.target)) if bn.op == "call_module" else None
            if isinstance(bn_mod, nn.BatchNorm2d):
                pats.conv_bn.append(ConvBN(owner, str(bn.target)))
            elif "batch_norm" in op_name(bn, gm) and len(bn.args) > 1:
                use = trace_param(bn.args[1], cg.params)
                if use is not None and bn.args[0] is node:
                    pats.conv_bn.append(ConvBN(owner, use.param.rpartition(".")[0]))
    for node in gm.graph.nodes:
        if op_name(node, gm) != "add" or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for skip, branch in ((a, b), (b, a)):
            op = _nearest_weight_op(branch, cg)
            if op is not None and _ancestor(skip, op[1]):  # y = x + f(x), f has a weight op
                pats.residuals.append(ResidualAdd(node.name, module_path(node) or "", op[0]))
                break
    return pats


def _prefixed(p: Patterns, prefix: str) -> Patterns:
    def j(name: str | None) -> str:
        return f"{prefix}.{name}" if prefix and name else (name or prefix)

    return Patterns(
        [NormLinearsGroup(j(g.norm), tuple(j(x) for x in g.linears), g.inline)
         for g in p.norm_linears],
        [FusedProjection(j(f.linear), f.parts) for f in p.fused],
        [ResidualAdd(r.node, j(r.module), None if r.branch is None else j(r.branch))
         for r in p.residuals],
        [LinearActivation(j(x.linear), x.activation) for x in p.linear_act],
        [ValueOutputPair(j(x.v), j(x.o)) for x in p.value_output],
        [ConvBN(j(x.conv), j(x.bn)) for x in p.conv_bn],
    )  # fmt: skip


def find_patterns(captured: Capture) -> Patterns:
    """Patterns of every captured graph, repeated for every block of the same structure."""
    total = Patterns()
    for cg in captured.graphs:
        rel = graph_patterns(cg)
        if captured.block_path is None:
            prefixes = [cg.prefix]
        else:
            rep = int(cg.prefix.rsplit(".", 1)[1])
            prefixes = [f"{captured.block_path}.{i}" for i in captured.block_groups[rep]]
        for prefix in prefixes:
            p = _prefixed(rel, prefix)
            for name in vars(total):
                getattr(total, name).extend(getattr(p, name))
    return total
