"""Capture a model, or one repeated block of it, as an FX graph.

Capture tries, in order, ``torch.export.export(..., strict=False)`` (ATen graph with
``nn_module_stack`` metadata and a graph signature mapping placeholders to parameter
names) and ``torch.fx.symbolic_trace`` (Python-level graph with ``call_module`` and
``get_attr`` nodes). Each failure is recorded; when both fail the caller falls back to
a module walk (see :mod:`ptq.frontend.quantizable`).

For decoder LLMs only the repeated blocks matter: blocks are grouped by structural
signature (parameter names, shapes and module types), and one representative of each
group is captured with the real ``args``/``kwargs`` it receives during a one-sequence
forward pass (a pre-hook records them and aborts the pass once every representative
has been seen). The embedding, final norm and head are found by a module walk, so the
cost of capture does not grow with depth (an 80-block model costs one block export).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind

from ptq.frontend.blocks import block_groups, find_blocks

CaptureMethod = Literal["export", "symbolic_trace"]


@dataclass
class CapturedGraph:
    """One captured graph.

    Attributes:
        graph_module: The FX graph (``ExportedProgram.graph_module`` for ``export``).
        method: Which capture method succeeded.
        prefix: Module path of the captured root inside the full model ('' = whole model).
        params: Graph node name -> parameter name relative to the captured root
            (placeholders for ``export``, ``get_attr`` targets for ``symbolic_trace``).
        root: The captured module.
        failures: Why earlier methods failed, ``"method: message"``.
        inputs: Placeholder names of the user inputs, in call order (the first is the
            hidden states for a block).
    """

    graph_module: fx.GraphModule
    method: CaptureMethod
    prefix: str
    params: dict[str, str]
    root: nn.Module
    failures: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


@dataclass
class Capture:
    """The result of :func:`capture`.

    Attributes:
        graphs: Captured graphs, one per block group (or one for the whole model).
        block_path: Path of the repeated-block ``ModuleList`` (None: whole model).
        block_groups: Representative block index -> every block index with its structure.
        failures: Module prefix -> reasons capture failed there (module walk needed).
    """

    graphs: list[CapturedGraph] = field(default_factory=list)
    block_path: str | None = None
    block_groups: dict[int, list[int]] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)

    @property
    def methods(self) -> dict[str, str]:
        """Captured prefix -> method used (``export`` or ``symbolic_trace``)."""
        return {g.prefix: g.method for g in self.graphs}


class _Stop(Exception):
    """Raised by the recording hook once every wanted block has been seen."""


def record_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    wanted: list[int],
    example_inputs: tuple[Any, ...] | Mapping[str, Any],
) -> dict[int, tuple[tuple[Any, ...], dict[str, Any]]]:
    """Run ``model`` on ``example_inputs`` and record the args/kwargs of ``wanted`` blocks."""
    seen: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []

    def make_hook(idx: int) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen[idx] = (args, _exportable_kwargs(kwargs))
            if len(seen) == len(wanted):
                raise _Stop

        return hook

    for idx in wanted:
        handles.append(blocks[idx].register_forward_pre_hook(make_hook(idx), with_kwargs=True))
    try:
        with torch.no_grad():
            if isinstance(example_inputs, Mapping):
                model(**example_inputs)
            else:
                model(*example_inputs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in wanted if i not in seen]
    if missing:
        raise ValueError(f"blocks {missing} were not called during the example forward pass")
    return seen


def _exportable(value: Any) -> bool:
    if value is None or isinstance(value, torch.Tensor | int | float | bool | str):
        return True
    if isinstance(value, tuple | list):
        return all(_exportable(v) for v in value)
    return False


def _exportable_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop kwargs export cannot take (caches and other custom objects)."""
    return {k: v for k, v in kwargs.items() if _exportable(v)}


def default_example_inputs(model: nn.Module, seq_len: int = 8) -> dict[str, Any]:
    """A one-sequence token batch for a transformers model (ids 1..seq_len, no cache)."""
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:
        raise ValueError(
            f"{type(model).__name__} has no config.vocab_size; pass example_inputs to capture"
        )
    ids = (torch.arange(seq_len) % (vocab - 1) + 1).unsqueeze(0)
    device = next(iter(model.parameters())).device
    inputs: dict[str, Any] = {"input_ids": ids.to(device)}
    if getattr(config, "use_cache", None) is not None:
        inputs["use_cache"] = False
    return inputs


def embedded_example_inputs(
    model: nn.Module, dtype: torch.dtype, device: torch.device, seq_len: int = 8
) -> dict[str, Any] | None:
    """A one-sequence batch given as ``inputs_embeds`` (zeros, ``[1, seq_len, hidden]``),
    for a transformers model whose forward takes them; None otherwise.

    Capture only needs the arguments the blocks receive, not their values (the graph is
    traced on fake tensors), so a model whose embedding matrix is not loaded (a lazily
    read checkpoint: 0.4 GB for a 49k x 2048 vocabulary) can be captured this way.
    """
    import inspect

    forward = getattr(model, "forward", None)
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if forward is None or not isinstance(emb, nn.Embedding):
        return None
    if "inputs_embeds" not in inspect.signature(forward).parameters:
        return None
    hidden = torch.zeros(1, seq_len, emb.embedding_dim, dtype=dtype, device=device)
    inputs: dict[str, Any] = {"inputs_embeds": hidden}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        inputs["use_cache"] = False
    return inputs


def capture_module(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    prefix: str = "",
    methods: tuple[CaptureMethod, ...] = ("export", "symbolic_trace"),
) -> CapturedGraph | list[str]:
    """Capture ``module``; return the graph, or the list of failure reasons."""
    failures: list[str] = []
    for method in methods:
        try:
            if method == "export":
                ep = torch.export.export(module, args, kwargs or {}, strict=False)
                sig = ep.graph_signature
                params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
                gm = ep.graph_module
                user = [
                    s.arg.name
                    for s in sig.input_specs
                    if s.kind == InputKind.USER_INPUT and hasattr(s.arg, "name")
                ]
            else:
                gm = fx.symbolic_trace(module)
                params = {n.name: str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
                user = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        except Exception as exc:  # capture failures are data: try the next method
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failures.append(f"{method}: {type(exc).__name__}: {first[:200]}")
            continue
        return CapturedGraph(gm, method, prefix, params, module, failures, user)
    return failures


def capture(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
    *,
    block_wise: bool | None = None,
    seq_len: int = 8,
    methods: tuple[CaptureMethod, ...] = ("export", "symbolic_trace"),
) -> Capture:
    """Capture ``model`` block-wise (decoder LLMs) or whole.

    Args:
        model: The model (eval mode is the caller's business).
        example_inputs: Positional tuple or kwargs mapping for ``model``; defaults to a
            one-sequence token batch for transformers models.
        block_wise: Force (True) or forbid (False) block capture; None = auto.
        seq_len: Tokens in the default example batch.
        methods: Capture methods to try, in order.
    """
    found = find_blocks(model) if block_wise is not False else None
    if block_wise and found is None:
        raise ValueError(f"{type(model).__name__}: no repeated block ModuleList found")
    inputs = default_example_inputs(model, seq_len) if example_inputs is None else example_inputs
    result = Capture()
    if found is None:
        args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else (tuple(inputs), {})
        got = capture_module(model, args, kwargs, methods=methods)
        if isinstance(got, list):
            result.failures[""] = got
        else:
            result.graphs.append(got)
        return result
    path, blocks = found
    result.block_path = path
    result.block_groups = block_groups(blocks)
    recorded = record_block_inputs(model, blocks, sorted(result.block_groups), inputs)
    for rep, (args, kwargs) in sorted(recorded.items()):
        prefix = f"{path}.{rep}"
        got = capture_module(blocks[rep], args, kwargs, prefix=prefix, methods=methods)
        if isinstance(got, list):
            result.failures[prefix] = got
        else:
            result.graphs.append(got)
    return result
