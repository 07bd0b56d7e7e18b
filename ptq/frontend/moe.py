"""Calibration data for mixture-of-experts layers: every expert sees every token.

With top-k routing, an expert receives only the tokens routed to it; on a small
calibration set some experts receive few or none, so their Hessians ``X^T X`` (GPTQ)
and activation ranges are rank-deficient or empty. ptq therefore calibrates fused
experts (transformers 5 keeps them as ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]`` parameters) on the *full* token set that reaches the MoE block:

1. ``gate_up_proj`` of every expert gets all ``T`` tokens ``x [T, H]`` (the router's
   input), so ``H_e = 2 X^T X / T`` is the same well-conditioned matrix for each ``e``;
2. ``down_proj`` of expert ``e`` gets ``act(x W_gate,e^T) * (x W_up,e^T)`` for all ``T``
   tokens, i.e. the expert is run on every token;
3. the block output that feeds the next block is still the routed mixture (only the
   statistics use all tokens), so later blocks see the model's true activations.

This is the "calibrate all experts" option of llm-compressor and the dense-routing
variant discussed for GPTQ on Mixtral; routed-only statistics are kept as the
``routed`` option (weights per token = how often it was routed to the expert).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

MoEPolicy = Literal["all_tokens", "routed"]


def moe_calibration_note() -> str:
    """One line for plans and logs: how experts get calibration data."""
    return (
        "MoE experts are calibrated on every token that reaches the MoE block (all "
        "experts run on all tokens for statistics; the routed mixture feeds the next block)"
    )


def expert_token_mask(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E, T]`` boolean: token ``t`` was routed to expert ``e`` (``top_k_index [T, k]``)."""
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be [T, k], got {tuple(top_k_index.shape)}")
    if top_k_index.numel() and int(top_k_index.max()) >= num_experts:
        raise ValueError(f"top_k_index holds an expert id >= num_experts={num_experts}")
    hit = torch.nn.functional.one_hot(top_k_index.long(), num_experts).sum(dim=1) > 0
    return hit.t()


def expert_inputs(
    hidden: torch.Tensor,
    gate_up_proj: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    *,
    policy: MoEPolicy = "all_tokens",
    top_k_index: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs of each expert's ``gate_up_proj`` and ``down_proj`` for calibration.

    Args:
        hidden: ``[T, H]`` tokens reaching the MoE block (after its norm).
        gate_up_proj: ``[E, 2I, H]`` fused gate/up weights (gate first, as transformers).
        act: The expert activation (SiLU for Mixtral/Qwen-MoE).
        policy: ``all_tokens`` (default, see module docstring) or ``routed``.
        top_k_index: ``[T, k]`` routed expert ids; required for ``routed``.

    Returns:
        Two lists of length ``E``: ``[T_e, H]`` and ``[T_e, I]`` inputs per expert.
    """
    if hidden.dim() != 2 or gate_up_proj.dim() != 3 or gate_up_proj.shape[2] != hidden.shape[1]:
        raise ValueError(
            f"expert_inputs needs hidden [T, H] and gate_up_proj [E, 2I, H]; got "
            f"{tuple(hidden.shape)} and {tuple(gate_up_proj.shape)}"
        )
    n_exp = gate_up_proj.shape[0]
    if policy == "routed":
        if top_k_index is None:
            raise ValueError("policy 'routed' needs top_k_index")
        mask = expert_token_mask(top_k_index, n_exp)
    elif policy == "all_tokens":
        mask = torch.ones(n_exp, hidden.shape[0], dtype=torch.bool, device=hidden.device)
    else:
        raise ValueError(f"unknown MoE calibration policy {policy!r}; use all_tokens or routed")
    ins, downs = [], []
    for e in range(n_exp):
        x = hidden[mask[e]]
        gate, up = torch.nn.functional.linear(x, gate_up_proj[e].to(x.dtype)).chunk(2, dim=-1)
        ins.append(x)
        downs.append(act(gate) * up)
    return ins, downs
