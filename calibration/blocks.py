"""Capture the inputs of a transformer's first block and run blocks on them.

Block-wise calibration needs the ``ModuleList`` of blocks (found by
:func:`ptq.frontend.blocks.find_blocks`) and the exact positional and
keyword arguments block 0 receives (hidden states, rotary embeddings, masks); those
kwargs are the same for every block, so later blocks reuse them with new hidden states.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward early (its inputs are recorded)."""


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """One calibration forward: token ids as ``input_ids`` (no KV cache) or a dict of inputs.

    Raises:
        ValueError: ``batch`` is neither a tensor nor a mapping.
    """
    if isinstance(batch, torch.Tensor):
        return model(input_ids=batch, use_cache=False)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise ValueError(
        f"a calibration batch must be token ids or a dict of model inputs, not {type(batch).__name__}"
    )


@dataclass
class BlockInput:
    """One calibration batch's input to a block: hidden states plus fixed kwargs."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def block_output(out: Any) -> torch.Tensor:
    """Hidden states from whatever a block returns (tensor, tuple or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list):
        return out[0]
    return out[0]


def _accepts(module: nn.Module, name: str) -> bool:
    params = inspect.signature(module.forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: Sequence[Any]
) -> list[BlockInput]:
    """Run the model up to ``first_block`` on each batch; record its inputs.

    A batch is a tensor of token ids or a dict of model inputs (see :func:`forward_batch`).
    """
    captured: list[BlockInput] = []

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {
            k: v
            for k, v in kwargs.items()
            if k not in ("past_key_value", "past_key_values", "cache")
        }
        if "use_cache" in kwargs or _accepts(first_block, "use_cache"):
            kwargs["use_cache"] = False
        captured.append(BlockInput(hidden.detach(), tuple(args[1:]), kwargs))
        raise StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(StopForward):
                forward_batch(model, batch)
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("the first block was not reached during calibration")
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInput]) -> list[torch.Tensor]:
    """Outputs of ``block`` for each captured input."""
    return [block_output(block(x.hidden, *x.args, **x.kwargs)) for x in inputs]


def to_device(batch: Any, device: torch.device) -> Any:
    """A calibration batch (token ids or a dict of inputs) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch
