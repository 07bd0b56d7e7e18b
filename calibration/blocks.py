"""Find the repeated decoder blocks of a transformer and capture their inputs.

Block-wise calibration needs the ``ModuleList`` of blocks and the exact positional and
keyword arguments block 0 receives (hidden states, rotary embeddings, masks); those
kwargs are the same for every block, so later blocks reuse them with new hidden states.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BLOCK_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "model.language_model.layers",
    "gpt_neox.layers",
    "encoder.layer",
    "bert.encoder.layer",
    "layers",
)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The dotted path and ``ModuleList`` of the model's repeated blocks, if any."""
    for path in BLOCK_PATHS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return path, mod
    return None


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


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
        return out[0]  # type: ignore[no-any-return]
    return out[0]  # type: ignore[no-any-return]


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor]
) -> list[BlockInput]:
    """Run the model up to ``first_block`` on each batch of token ids; record its inputs."""
    captured: list[BlockInput] = []

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {
            k: v
            for k, v in kwargs.items()
            if k not in ("past_key_value", "past_key_values", "cache")
        }
        kwargs["use_cache"] = False
        captured.append(BlockInput(hidden.detach(), tuple(args[1:]), kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            with contextlib.suppress(_StopForward):
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("the first block was not reached during calibration")
    return captured


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[BlockInput]) -> list[torch.Tensor]:
    """Outputs of ``block`` for each captured input."""
    return [block_output(block(x.hidden, *x.args, **x.kwargs)) for x in inputs]
