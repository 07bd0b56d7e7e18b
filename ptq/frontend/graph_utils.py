"""Small helpers to read captured FX graphs (``torch.export`` or ``symbolic_trace``).

Both graph flavours are read through the same questions: what operation does a node
run (:func:`op_name`), which module did it come from (:func:`module_path`), and which
parameter reaches one of its arguments through view-like ops (:func:`trace_param`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

PASS_THROUGH: frozenset[str] = frozenset(
    {
        "view", "reshape", "_unsafe_view", "to", "_to_copy", "contiguous", "clone", "detach",
        "alias", "lift_fresh_copy", "type_as", "float", "half", "bfloat16", "type",
        "transpose", "t", "permute", "select", "getitem", "expand", "unsqueeze",
        "squeeze", "flatten", "index", "numpy_T", "T", "mT",
    }
)  # fmt: skip
"""Ops that move or retype a tensor without mixing its values with others."""

LINEAR_OPS: frozenset[str] = frozenset({"linear"})
MM_OPS: frozenset[str] = frozenset(
    {"mm", "matmul", "bmm", "addmm", "baddbmm", "_grouped_mm", "grouped_mm"}
)
CONV_OPS: frozenset[str] = frozenset({"conv1d", "conv2d", "conv3d", "convolution", "_convolution"})
EMBED_OPS: frozenset[str] = frozenset({"embedding", "embedding_bag"})
ATTENTION_OPS: frozenset[str] = frozenset(
    {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
     "_scaled_dot_product_efficient_attention", "flex_attention"}
)  # fmt: skip
ACTIVATION_OPS: frozenset[str] = frozenset(
    {"silu", "gelu", "relu", "relu6", "hardtanh", "tanh", "sigmoid", "hardswish",
     "hardsigmoid", "mish", "elu", "leaky_relu", "softplus", "gelu_new", "quick_gelu"}
)  # fmt: skip


def op_name(node: fx.Node, gm: fx.GraphModule | None = None) -> str:
    """Normalised operation name: ``linear``, ``addmm``, ``conv2d``, ``add``, ``getitem``...

    ``call_module`` nodes return the module class name (``Linear``, ``Conv2d``...).
    Grouped matmul kernels with a vendor prefix (``grouped_mm_fallback``) map to
    ``grouped_mm``.
    """
    if node.op == "call_module":
        if gm is None:
            return str(node.target)
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return str(node.target).rstrip("_")
    if node.op != "call_function":
        return node.op
    target = node.target
    name = getattr(target, "_opname", None) or getattr(target, "__name__", str(target))
    name = str(name).split(".")[0]
    if "grouped_mm" in name:
        return "grouped_mm"
    return name.rstrip("_") if name not in ("_", "__") else name


def module_path(node: fx.Node) -> str | None:
    """Innermost module path (relative to the captured root) that produced ``node``."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _type = list(stack.values())[-1]
    path = str(path)
    if path.startswith("L['self']"):
        path = path[len("L['self']") :].lstrip(".")
    return path


def tensor_shape(node: object) -> tuple[int, ...] | None:
    """Static shape of a node's value from export metadata, if known."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except TypeError:
            return None
    return None


def as_int(value: object) -> int:
    """An integer op argument (dims, split sizes) as ``int``."""
    if not isinstance(value, int):
        raise ValueError(f"expected an integer graph argument, got {value!r}")
    return value


def _swaps_last_two(node: fx.Node, ndim: int) -> bool:
    name = op_name(node)
    if name in ("t", "T", "mT", "numpy_T"):
        return True
    if name == "transpose" and len(node.args) >= 3:
        a, b = (as_int(d) % ndim for d in node.args[1:3])
        return {a, b} == {ndim - 2, ndim - 1}
    if name == "permute" and len(node.args) >= 2:
        dims = node.args[1] if isinstance(node.args[1], list | tuple) else node.args[1:]
        perm = [as_int(d) % ndim for d in dims]
        return len(perm) >= 2 and perm[-2:] == [ndim - 1, ndim - 2]
    return False


@dataclass(frozen=True)
class ParamUse:
    """A parameter reaching an op argument: its name and how many times it was transposed."""

    param: str
    node: fx.Node
    transposes: int


def trace_param(arg: object, params: dict[str, str], max_hops: int = 8) -> ParamUse | None:
    """Follow ``arg`` back through view-like ops to a parameter node, if any.

    Args:
        arg: An op argument (an ``fx.Node`` or anything else).
        params: Graph node name -> parameter name (from the capture).
        max_hops: Longest chain of view-like ops followed.
    """
    node = arg
    swaps = 0
    for _ in range(max_hops + 1):
        if not isinstance(node, fx.Node):
            return None
        if node.name in params and node.op in ("placeholder", "get_attr"):
            return ParamUse(params[node.name], node, swaps)
        if op_name(node) not in PASS_THROUGH or not node.args:
            return None
        shape = tensor_shape(node.args[0])
        if (shape is not None and len(shape) >= 2 and _swaps_last_two(node, len(shape))) or (
            shape is None and op_name(node) in ("t", "transpose", "permute")
        ):
            swaps += 1
        node = node.args[0]
    return None
