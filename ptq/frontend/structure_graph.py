"""Read a :class:`~ptq.frontend.structure.BlockStructure` off one captured block graph.

Works on both capture flavours (``torch.export`` ATen graphs with ``nn_module_stack``
metadata, ``symbolic_trace`` graphs) through :mod:`ptq.frontend.graph_utils`:

* **residual stream**: from the block's first input, through value-preserving ops
  (casts, views that keep the last dimension, dropout) and every ``add`` it takes part
  in, to the block's output. Each add's other operand is walked back to the weights
  that *write* the stream, through ops that act on whole rows (views, sums, a per-token
  factor such as a router weight, ``index_add``); every other consumer of the stream
  must be a norm (the norms that *read* it).
* **norm groups**: each norm module's output followed through casts and views to the
  weights reading it; a norm whose output reaches anything else cannot absorb a scale.
* **v -> o**: each attention op (``scaled_dot_product_attention``, or an eager
  ``softmax(q k^T) v``) gives the value's producer (and its rows, when it is a slice of
  a fused ``qkv``; grouped-query repetition gives ``n_rep``) and the weight reading the
  attention output; the keys give the KV-cache point (a key norm if there is one) and
  whether RoPE is applied (a block input other than the hidden states reaches them).
* **up -> down**: a weight whose input is ``u * g`` with ``u`` a producer's output (or
  a slice of it) and ``g`` computed from other producers or other rows (the gated MLP
  ``act(gate) * up``), so a scale on ``u``'s channels can move into the reader.
* **routers**: weights whose output feeds a softmax, top-k or sigmoid gate.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import fx, nn

from ptq.frontend.capture import CapturedGraph
from ptq.frontend.graph_utils import (
    ATTENTION_OPS,
    CONV_OPS,
    LINEAR_OPS,
    MM_OPS,
    module_path,
    op_name,
    tensor_shape,
    trace_param,
)
from ptq.frontend.norms import is_norm_module, norm_style
from ptq.frontend.structure import (
    Attention,
    BlockStructure,
    CachePoint,
    LinearGroup,
    NormStyle,
)

CASTS = frozenset(
    {"to", "_to_copy", "contiguous", "clone", "alias", "detach", "type_as", "float", "type",
     "dropout", "native_dropout", "lift_fresh_copy"}
)  # fmt: skip
RESHAPES = frozenset({"view", "reshape", "_unsafe_view", "flatten"})
LAYOUT = frozenset(
    {"transpose", "permute", "t", "expand", "unsqueeze", "squeeze", "repeat_interleave"}
)
SPLITS = frozenset({"split", "split_with_sizes", "chunk", "tensor_split", "unbind"})
SHAPE_ONLY = frozenset(
    {"zeros_like", "empty_like", "ones_like", "full_like", "new_zeros", "new_empty", "sym_size",
     "size", "_assert_tensor_metadata", "_assert_scalar", "sym_numel"}
)  # fmt: skip
ZEROS = frozenset({"zeros", "zeros_like", "new_zeros", "full", "full_like", "empty", "empty_like"})
GATES = frozenset({"softmax", "_softmax", "_safe_softmax", "sigmoid", "topk"})
SOFTMAX = frozenset({"softmax", "_softmax", "_safe_softmax"})
WEIGHT_OPS = LINEAR_OPS | MM_OPS | CONV_OPS


@dataclass
class _Graph:
    """A captured block graph with the lookups the analysis needs."""

    cg: CapturedGraph
    order: dict[fx.Node, int] = field(default_factory=dict)
    owners: dict[fx.Node, str] = field(default_factory=dict)
    member: dict[fx.Node, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        raw: dict[fx.Node, str] = {}
        for i, n in enumerate(self.cg.graph_module.graph.nodes):
            self.order[n] = i
            owner = weight_owner(n, self.cg)
            if owner is not None:
                raw[n] = owner
        # A leaf weight module (a Linear, or ptq's quantized one with its activation
        # fake-quantizer and LoRC branch) is one op: its output node stands for it.
        leaves = [o for o in dict.fromkeys(raw.values()) if _is_weight_leaf(self.module(o))]
        for n in self.order:
            path = module_path(n) if n.op != "placeholder" else None
            if path is not None:
                leaf = next((m for m in leaves if path == m or path.startswith(m + ".")), None)
                if leaf is not None:
                    self.member[n] = leaf
        for leaf in leaves:
            region = [n for n, m in self.member.items() if m == leaf]
            out = _region_output(self, region)
            if out is not None:
                self.owners[out] = leaf
        for n, owner in raw.items():
            if owner not in leaves:
                self.owners[n] = owner
        self.owners = dict(sorted(self.owners.items(), key=lambda kv: self.order[kv[0]]))

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.order)

    def module(self, path: str) -> nn.Module:
        return self.cg.root.get_submodule(path) if path else self.cg.root

    def is_norm(self, path: str | None) -> bool:
        if not path:
            return False
        try:
            return is_norm_module(self.module(path))
        except AttributeError:
            return False

    def reader_of(self, user: fx.Node, src: fx.Node) -> str | None:
        """The weight whose input ``src`` is, when ``user`` consumes it as that input."""
        leaf = self.member.get(user)
        if leaf is not None:
            return leaf if self.member.get(src) != leaf else None
        if user in self.owners and user.args and _feeds_input(user, src):
            return self.owners[user]
        return None

    def input_of(self, op: fx.Node) -> fx.Node | None:
        """The activation input of weight op ``op`` (its region's input for a leaf)."""
        leaf = self.member.get(op)
        if leaf is not None:
            for n in sorted(
                (m for m, lf in self.member.items() if lf == leaf), key=self.order.__getitem__
            ):
                for a in n.all_input_nodes:
                    inside = self.member.get(a) == leaf
                    constant = a.op == "placeholder" and a.name not in self.cg.inputs
                    if not inside and not constant:
                        return a
            return None
        if op_name(op) in ("addmm", "baddbmm"):
            x = op.args[1] if len(op.args) > 1 else None
        else:
            x = op.args[0] if op.args else None
        return x if isinstance(x, fx.Node) else None

    def inputs(self) -> list[fx.Node]:
        by_name = {n.name: n for n in self.order if n.op == "placeholder"}
        return [by_name[n] for n in self.cg.inputs if n in by_name]

    def where(self, node: fx.Node) -> str:
        path = module_path(node) or ""
        if not path:
            return "the block"
        return f"{path} ({type(self.module(path)).__name__})"


def weight_owner(node: fx.Node, cg: CapturedGraph) -> str | None:
    """Relative module name of the weight a linear/mm/conv node multiplies by, if any."""
    gm = cg.graph_module
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        ok = isinstance(mod, nn.Linear | nn.Conv1d | nn.Conv2d)
        return str(node.target) if ok else None
    if op_name(node, gm) not in WEIGHT_OPS:
        return None
    for arg in node.args[:3]:
        use = trace_param(arg, cg.params)
        if use is None:
            continue
        owner, _, pname = use.param.rpartition(".")
        if pname == "bias":
            continue
        here = module_path(node)
        if here and here != owner:  # tied weights: the module that ran the op
            w = getattr(cg.root.get_submodule(owner) if owner else cg.root, pname)
            if getattr(cg.root.get_submodule(here), pname, None) is w:
                return here
        return owner
    return None


def _is_weight_leaf(module: nn.Module) -> bool:
    from ptq.frontend.quantizable import is_hf_conv1d

    return (
        isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d)
        or is_hf_conv1d(module)
        or hasattr(module, "qweight")
    )


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


def _width(node: object) -> int | None:
    shape = tensor_shape(node)
    return shape[-1] if shape else None


def _keeps_width(node: fx.Node, src: fx.Node) -> bool:
    if op_name(node) not in RESHAPES:
        return True
    a, b = _width(node), _width(src)
    return a is not None and a == b


# ------------------------------------------------------------------ residual stream
@dataclass
class _Stream:
    nodes: set[fx.Node] = field(default_factory=set)
    adds: list[fx.Node] = field(default_factory=list)
    readers: list[fx.Node] = field(default_factory=list)


def _stream(g: _Graph, hidden: fx.Node) -> _Stream:
    s = _Stream(nodes={hidden})
    todo = deque([hidden])
    while todo:
        n = todo.popleft()
        for u in n.users:
            if u in s.nodes or u.op == "output":
                continue
            name = op_name(u)
            if name in SHAPE_ONLY:
                continue
            if name in CASTS | RESHAPES and u.args and u.args[0] is n and _keeps_width(u, n):
                s.nodes.add(u)
                todo.append(u)
            elif name in ("add", "add_") and len(_tensor_args(u)) == 2:
                s.nodes.add(u)
                s.adds.append(u)
                todo.append(u)
            else:
                s.readers.append(u)
    return s


def _output_in_stream(g: _Graph, stream: _Stream) -> bool:
    out = next(n for n in reversed(g.nodes) if n.op == "output")
    first = out.args[0]
    while isinstance(first, tuple | list) and first:
        first = first[0]
    return isinstance(first, fx.Node) and first in stream.nodes


def _per_row(node: fx.Node) -> bool:
    shape = tensor_shape(node)
    return shape is not None and len(shape) >= 1 and shape[-1] == 1


def _writers(g: _Graph, start: fx.Node) -> tuple[list[str], list[str]]:
    """Weights whose output reaches ``start`` through row-wise ops; problems otherwise."""
    writers: list[str] = []
    problems: list[str] = []
    todo: list[object] = [start]
    seen: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n in g.owners:
            writers.append(g.owners[n])
            continue
        name = op_name(n)
        tensors = _tensor_args(n)
        if name in CASTS | RESHAPES and tensors:
            todo.append(n.args[0])
        elif name in ("add", "add_", "sub", "sum", "cat", "stack"):
            todo += tensors if name not in ("cat", "stack") else list(n.args[0])  # type: ignore[arg-type]
        elif name in ("mul", "mul_", "div") and len(tensors) == 1:
            todo.append(tensors[0])
        elif name in ("mul", "mul_") and sum(_per_row(t) for t in tensors) == 1:
            todo.append(next(t for t in tensors if not _per_row(t)))
        elif name in ("index_add", "index_add_", "scatter_add"):
            todo += [n.args[0], n.args[-1]]
        elif name in ZEROS:
            continue
        else:
            path = module_path(n)
            if g.is_norm(path):
                problems.append(
                    f"{g.where(n)}: a norm writes to the residual stream (it scales a block "
                    "output per channel before the residual add), so a rotation of the stream "
                    "cannot be fused through it"
                )
            else:
                problems.append(
                    f"{g.where(n)}: {name} on a block output before the residual add mixes or "
                    "scales channels, so a rotation of the stream cannot be fused through it"
                )
    return writers, problems


# ------------------------------------------------------------------------- norms
def _region(g: _Graph, path: str) -> list[fx.Node]:
    return [n for n in g.nodes if n.op != "placeholder" and (module_path(n) or "") == path]


def _region_output(g: _Graph, region: list[fx.Node]) -> fx.Node | None:
    inside = set(region)
    outs = [n for n in region if any(u not in inside for u in n.users)]
    return max(outs, key=g.order.__getitem__) if outs else None


def _consumers(g: _Graph, out: fx.Node) -> tuple[list[str], list[fx.Node]]:
    """Weights reading ``out`` through casts/views, and every other consumer."""
    readers: list[str] = []
    other: list[fx.Node] = []
    todo = deque([out])
    seen: set[fx.Node] = set()
    while todo:
        n = todo.popleft()
        for u in sorted(n.users, key=g.order.__getitem__):
            if u in seen:
                continue
            seen.add(u)
            name = op_name(u)
            if u in g.member and g.member.get(n) == g.member[u]:
                continue  # inside the weight op that ``n`` already entered
            reader = g.reader_of(u, n)
            if reader is not None:
                readers.append(reader)
                if name in CASTS | RESHAPES and u.args and u.args[0] is n:
                    todo.append(u)  # a cast the exporter shared between weight ops
            elif name in SHAPE_ONLY:
                continue
            elif name in CASTS | RESHAPES and u.args and u.args[0] is n:
                todo.append(u)
            else:
                other.append(u)
    return list(dict.fromkeys(readers)), other


def _feeds_input(op: fx.Node, src: fx.Node) -> bool:
    """Whether ``src`` is the activation operand of weight op ``op`` (not its weight)."""
    name = op_name(op)
    if op.op == "call_module":
        return op.args[0] is src
    if name in ("addmm", "baddbmm"):
        return len(op.args) > 1 and op.args[1] is src
    return bool(op.args) and op.args[0] is src


@dataclass
class _Norms:
    groups: list[LinearGroup] = field(default_factory=list)
    styles: dict[str, NormStyle] = field(default_factory=dict)
    outputs: dict[str, fx.Node] = field(default_factory=dict)
    foldable: dict[str, bool] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)


def _norms(g: _Graph) -> _Norms:
    found = _Norms()
    paths = dict.fromkeys(module_path(n) or "" for n in g.nodes if n.op != "placeholder")
    for path in paths:
        if not g.is_norm(path):
            continue
        module = g.module(path)
        try:
            style = norm_style(module, path)
        except ValueError as exc:
            found.problems[path] = str(exc)
            continue
        found.styles[path] = style
        out = _region_output(g, _region(g, path))
        if out is None:
            continue
        found.outputs[path] = out
        readers, other = _consumers(g, out)
        found.foldable[path] = bool(readers) and not other
        if other and readers:
            found.problems[path] = (
                f"{path} ({type(module).__name__}): its output feeds "
                f"{op_name(other[0])} in {g.where(other[0])} besides the weights "
                f"{', '.join(readers[:3])}, so it cannot absorb their scales"
            )
        if readers and not other:
            found.groups.append(LinearGroup(path, "norm", tuple(readers), style=style))
    return found


# ------------------------------------------------------------ sources and rows
def _rows_on_path(g: _Graph, owner_node: fx.Node, path: list[fx.Node]) -> tuple[int, int] | None:
    """Rows of ``owner_node``'s output selected along ``path`` (outermost last)."""
    width = _width(owner_node)
    if width is None:
        return None
    start, end = 0, width
    feature = True
    pending_split: fx.Node | None = None
    for n in path:
        name = op_name(n)
        shape = tensor_shape(n.args[0]) if n.args else None
        ndim = len(shape) if shape else 0
        if not feature:
            break
        if name in CASTS:
            continue
        if name in RESHAPES:
            feature = _width(n) == end - start
        elif name == "slice" and len(n.args) >= 2 and ndim:
            if _arg(n, 1, 0) % ndim != ndim - 1:
                feature = False
                continue
            lo, hi = max(_arg(n, 2, 0), 0), min(_arg(n, 3, end - start), end - start)
            start, end = start + lo, start + hi
        elif name in SPLITS:
            pending_split = n
        elif name == "getitem" and pending_split is not None:
            rows = _split_rows(pending_split, _arg(n, 1, 0), end - start)
            pending_split = None
            if rows is None:
                feature = False
                continue
            start, end = start + rows[0], start + rows[1]
        else:
            feature = False
    if (start, end) == (0, width):
        return None
    return (start, end)


def _arg(node: fx.Node, i: int, default: int) -> int:
    """Integer argument ``i`` of ``node`` (``default`` when absent, None or not an int)."""
    value = node.args[i] if len(node.args) > i else None
    return value if isinstance(value, int) else default


def _split_rows(split: fx.Node, index: int, width: int) -> tuple[int, int] | None:
    name = op_name(split)
    shape = tensor_shape(split.args[0])
    ndim = len(shape) if shape else 0
    dim = _arg(split, 2, 0)
    if name == "chunk":
        parts = max(_arg(split, 1, 1), 1)
        sizes = [-(-width // parts)] * parts
    elif name in ("split", "split_with_sizes"):
        size = split.args[1]
        if isinstance(size, list | tuple):
            sizes = [s if isinstance(s, int) else 0 for s in size]
        else:
            step = max(_arg(split, 1, width), 1)
            sizes = [step] * -(-width // step)
    else:
        return None
    if not ndim or dim % ndim != ndim - 1 or index >= len(sizes):
        return None
    lo = sum(sizes[:index])
    return lo, min(lo + sizes[index], width)


def _source(
    g: _Graph, node: object, through: frozenset[str]
) -> tuple[fx.Node, str, tuple[int, int] | None] | None:
    """The weight op producing ``node`` through ``through`` ops, slices and splits."""
    path: list[fx.Node] = []
    cur = node
    for _ in range(64):
        if not isinstance(cur, fx.Node):
            return None
        if cur in g.owners:
            return cur, g.owners[cur], _rows_on_path(g, cur, path[::-1])
        name = op_name(cur)
        if name not in through | {"slice", "getitem"} | SPLITS or not cur.args:
            return None
        path.append(cur)
        cur = cur.args[0]
    return None


def _ancestors(node: fx.Node, limit: int = 5000) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = [node]
    while todo and len(seen) < limit:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _producers(g: _Graph, node: fx.Node) -> list[tuple[str, tuple[int, int] | None]]:
    """Weights (with rows) that ``node`` is computed from, stopping at each weight."""
    out: list[tuple[str, tuple[int, int] | None]] = []
    todo = [node]
    seen: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        src = _source(g, n, CASTS | RESHAPES)
        if src is not None:
            out.append((src[1], src[2]))
            continue
        todo += n.all_input_nodes
    return out


def _overlap(a: tuple[int, int] | None, b: tuple[int, int] | None, width: int) -> bool:
    a = a or (0, width)
    b = b or (0, width)
    return a[0] < b[1] and b[0] < a[1]


# --------------------------------------------------------------------- attention
@dataclass
class _AttentionOp:
    node: fx.Node
    key: fx.Node
    value: fx.Node


def _attention_ops(g: _Graph) -> list[_AttentionOp]:
    ops: list[_AttentionOp] = []
    for n in g.nodes:
        name = op_name(n)
        args = _tensor_args(n)
        if name in ATTENTION_OPS and len(n.args) >= 3:
            k, v = n.args[1], n.args[2]
            if isinstance(k, fx.Node) and isinstance(v, fx.Node):
                ops.append(_AttentionOp(n, k, v))
        elif name in ("matmul", "bmm") and len(args) == 2:
            probs = _back(args[0], CASTS | {"dropout"})
            if op_name(probs) not in SOFTMAX:
                continue
            if not isinstance(probs.args[0], fx.Node):
                continue
            scores = _back(
                probs.args[0], CASTS | {"add", "mul", "div", "tanh"}, stop={"matmul", "bmm"}
            )
            if op_name(scores) in ("matmul", "bmm") and isinstance(scores.args[1], fx.Node):
                ops.append(_AttentionOp(n, scores.args[1], args[1]))
    return ops


def _back(node: fx.Node, through: Iterable[str], stop: Iterable[str] = ()) -> fx.Node:
    """Follow arg 0 (for ``add``: the operand that is not a placeholder) through ops."""
    through, stop = set(through), set(stop)
    cur = node
    for _ in range(32):
        name = op_name(cur)
        if name in stop or name not in through:
            return cur
        nxt = [a for a in _tensor_args(cur) if a.op != "placeholder"]
        if not nxt:
            return cur
        cur = nxt[0]
    return cur


def _reader_after(g: _Graph, node: fx.Node) -> str | None:
    """The weight reading ``node`` through casts and layout ops (attention output -> o)."""
    todo = deque([node])
    seen: set[fx.Node] = set()
    while todo:
        n = todo.popleft()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            reader = g.reader_of(u, n)
            if reader is not None:
                return reader
            if op_name(u) in CASTS | RESHAPES | LAYOUT:
                todo.append(u)
    return None


def _cache_point(g: _Graph, key: fx.Node, norms: _Norms) -> tuple[CachePoint, bool] | None:
    """Where the keys are cached, and whether a block input other than the hidden states
    (position embeddings) reaches them (RoPE)."""
    anc = _ancestors(key)
    inputs = g.inputs()
    rotary = any(i in anc for i in inputs[1:])
    key_norms = [p for p, out in norms.outputs.items() if out in anc or out is key]
    key_norms = [p for p in key_norms if norms.styles.get(p) and not norms.foldable.get(p)]
    if key_norms:
        return CachePoint(max(key_norms, key=lambda p: g.order[norms.outputs[p]])), rotary
    owners = [n for n in anc if n in g.owners]
    if not owners:
        return None
    w = max(owners, key=g.order.__getitem__)
    rows = None
    for u in _feature_users(w):
        if op_name(u) in ("slice", "getitem") and (u in anc or u is key):
            src = _source(g, u, CASTS | RESHAPES)
            if src is not None and src[0] is w:
                rows = src[2]
    return CachePoint(g.owners[w], rows), rotary


def _feature_users(w: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    todo = [w]
    while todo:
        n = todo.pop()
        for u in n.users:
            out.append(u)
            if op_name(u) in CASTS | RESHAPES | SPLITS:
                todo.append(u)
    return out


def _attention(g: _Graph, norms: _Norms) -> tuple[list[Attention], list[LinearGroup]]:
    attns: list[Attention] = []
    groups: list[LinearGroup] = []
    for op in _attention_ops(g):
        src = _source(g, op.value, CASTS | RESHAPES | LAYOUT)
        o = _reader_after(g, op.node)
        head_dim = _width(op.value) or 0
        if src is not None and o is not None and head_dim:
            node, v, rows = src
            v_width = (rows[1] - rows[0]) if rows else (_width(node) or 0)
            o_in = _in_features(g.module(o))
            if v_width and o_in and o_in % v_width == 0:
                groups.append(LinearGroup(v, "linear", (o,), o_in // v_width, head_dim, rows=rows))
        key = _cache_point(g, op.key, norms)
        if src is not None and key is not None and head_dim:
            point, rotary = key
            value = CachePoint(src[1], src[2])
            attns.append(Attention(module_path(op.node) or "", point, value, head_dim, rotary))
    return attns, groups


def _in_features(module: nn.Module) -> int:
    w = getattr(module, "weight", None)
    if w is None or w.dim() != 2:
        return 0
    from ptq.frontend.quantizable import is_hf_conv1d

    return int(w.shape[0] if is_hf_conv1d(module) else w.shape[1])


# ----------------------------------------------------------------------- MLPs
def _gated(g: _Graph) -> list[LinearGroup]:
    groups: list[LinearGroup] = []
    for node, down in g.owners.items():
        x = g.input_of(node)
        if x is None:
            continue
        x = _back(x, CASTS | RESHAPES)
        if op_name(x) not in ("mul", "mul_") or len(_tensor_args(x)) != 2:
            continue
        a, b = _tensor_args(x)
        for u, gate in ((a, b), (b, a)):
            src = _source(g, u, CASTS | RESHAPES)
            if src is None:
                continue
            up_node, up, rows = src
            width = _width(up_node) or 0
            others = _producers(g, gate)
            if not others or any(o == up and _overlap(r, rows, width) for o, r in others):
                continue
            groups.append(LinearGroup(up, "linear", (down,), rows=rows))
            break
    return groups


def _routers(g: _Graph) -> list[str]:
    out = []
    for node, owner in g.owners.items():
        todo = [node]
        for _ in range(8):
            nxt = [u for n in todo for u in n.users]
            if any(op_name(u) in GATES for u in nxt):
                out.append(owner)
                break
            todo = [u for u in nxt if op_name(u) in CASTS | RESHAPES]
            if not todo:
                break
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------ block
def analyse_block(cg: CapturedGraph) -> BlockStructure:
    """The structure of the block captured as ``cg`` (names relative to the block)."""
    g = _Graph(cg)
    norms = _norms(g)
    inputs = g.inputs()
    problems: list[str] = list(norms.problems.values())
    residual_norms: list[str] = []
    writers: list[str] = []
    if not inputs:
        problems.append("the captured graph has no inputs")
    else:
        stream = _stream(g, inputs[0])
        if not _output_in_stream(g, stream):
            problems.append(
                "the block's output is not its input plus branches (post-norm residuals), "
                "so a rotation of the stream cannot be fused into it"
            )
        for u in stream.readers:
            path = module_path(u)
            if g.is_norm(path):
                assert path is not None
                residual_norms.append(path)
            else:
                problems.append(
                    f"{g.where(u)}: {op_name(u)} reads the residual stream directly (not "
                    "through a norm), so a rotation of the stream cannot be fused into it"
                )
        for add in stream.adds:
            for branch in _tensor_args(add):
                if branch not in stream.nodes:
                    found, why = _writers(g, branch)
                    writers += found
                    problems += why
    residual_norms = list(dict.fromkeys(residual_norms))
    for r in residual_norms:
        if not norms.foldable.get(r, False) and r not in norms.problems:
            problems.append(f"{r}: its output does not only feed weights, so it cannot be folded")
    attention, vo = _attention(g, norms)
    gated = _gated(g)
    return BlockStructure(
        norm_groups=tuple(norms.groups),
        value_groups=tuple(vo),
        gated_groups=tuple(gated),
        residual_norms=tuple(residual_norms),
        writers=tuple(dict.fromkeys(writers)),
        attention=tuple(attention),
        routers=tuple(_routers(g)),
        norm_styles=dict(norms.styles),
        problems=tuple(dict.fromkeys(problems)),
    )
