"""What AWQ records of a block in one sweep over its calibration forwards.

For each producer -> readers group: the sum of ``|x|`` per reader input channel and the
number of rows (for ``s_X = mean |x|``), a seeded random sample of input rows (for the
clipping search), and the positional and keyword inputs of the group's inspected module
(:func:`inspected`) for the first forwards up to a token budget (to score scales).

The readers of a group read one tensor, but not always all of it: a MoE expert sees only
the tokens routed to it. Every reader is recorded and the one that saw the most rows
stands for the group (a dense group's first reader; a MoE block's router, which sees
every token).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from ptq.passes.awq import AWQConfig

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


class Group(Protocol):
    """What the capture reads of a producer -> readers group (module names only)."""

    @property
    def producer(self) -> str: ...

    @property
    def readers(self) -> tuple[str, ...]: ...


@dataclass
class GroupInputs:
    """One group's record (module docstring); ``rows`` is ``[n, C]`` on the data's device."""

    abs_sum: torch.Tensor | None = None
    count: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)
    inputs: list[Inputs] = field(default_factory=list)
    tokens: int = 0

    @property
    def rows(self) -> torch.Tensor:
        return torch.cat(self.samples)

    def mean_abs(self) -> torch.Tensor:
        """``s_X``: mean ``|x|`` per reader input channel."""
        if self.abs_sum is None or not self.count:
            raise ValueError("no input reached this group's readers during calibration")
        return self.abs_sum / self.count


def inspected(model: nn.Module, group: Group) -> nn.Module:
    """The smallest module holding all of ``group``'s readers (the reader itself if one):
    attention for q/k/v, the MLP for gate/up, a MoE block for its router and experts."""
    if len(group.readers) == 1:
        return model.get_submodule(group.readers[0])
    paths = [r.split(".") for r in group.readers]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    if not common:
        raise ValueError(f"readers of {group.producer} have no common parent: {group.readers}")
    return model.get_submodule(".".join(common))


def _tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Tokens in a call: the first tensor argument's elements over its last dimension."""
    for v in (*args, kwargs.get("hidden_states"), *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            return v.numel() // v.shape[-1]
    return 0


def capture_group_inputs(
    model: nn.Module,
    groups: Sequence[Group],
    forwards: Sequence[Callable[[], Any]],
    config: AWQConfig,
    generator: torch.Generator,
) -> dict[str, GroupInputs]:
    """Run ``forwards`` once, recording every group's :class:`GroupInputs` (by producer)."""
    per_forward = math.ceil(config.clip_tokens / max(len(forwards), 1))
    by_reader: dict[tuple[str, str], GroupInputs] = {}
    modules: dict[str, GroupInputs] = {}
    handles = []

    def on_reader(
        key: tuple[str, str], gen: torch.Generator, _m: nn.Module, args: tuple[Any, ...]
    ) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        if not x.shape[0]:
            return
        rec = by_reader.setdefault(key, GroupInputs())
        total = x.float().abs().sum(dim=0)
        rec.abs_sum = total if rec.abs_sum is None else rec.abs_sum + total
        rec.count += x.shape[0]
        pick = torch.randperm(x.shape[0], generator=gen)[:per_forward]
        rec.samples.append(x[pick.sort().values.to(x.device)].float().clone())

    def on_module(g: Group, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rec = modules.setdefault(g.producer, GroupInputs())
        if rec.tokens < config.search_tokens:
            rec.inputs.append((args, dict(kwargs)))
            rec.tokens += _tokens(args, kwargs)

    for g in groups:
        for i, r in enumerate(g.readers):
            # the first reader draws from the pass's generator, the others (which stand
            # for the group only when they saw more rows) from their own seeded ones
            gen = (
                generator if i == 0 else torch.Generator().manual_seed(generator.initial_seed() + i)
            )
            reader = model.get_submodule(r)
            handles.append(
                reader.register_forward_pre_hook(partial(on_reader, (g.producer, r), gen))
            )
    for g in groups:  # after the reader hooks: a single-reader group inspects the reader
        module = inspected(model, g)
        handles.append(module.register_forward_pre_hook(partial(on_module, g), with_kwargs=True))
    try:
        with torch.no_grad():
            for forward in forwards:
                forward()
    finally:
        for h in handles:
            h.remove()
    seen: dict[str, GroupInputs] = {}
    for g in groups:
        recs = [by_reader[(g.producer, r)] for r in g.readers if (g.producer, r) in by_reader]
        if not recs:
            continue
        widest = max(recs, key=lambda rec: rec.count)  # first reader on ties
        scored = modules.get(g.producer, GroupInputs())
        widest.inputs, widest.tokens = scored.inputs, scored.tokens
        seen[g.producer] = widest
    return seen
