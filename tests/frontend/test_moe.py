"""MoE calibration inputs: every expert sees every token (or only its routed ones)."""

from __future__ import annotations

import pytest
import torch

from ptq.frontend.moe import expert_inputs, expert_token_mask, moe_calibration_note


def test_all_tokens_policy_runs_every_expert_on_every_token() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 8, generator=g)
    gate_up = torch.randn(3, 2 * 5, 8, generator=g)
    ins, downs = expert_inputs(hidden, gate_up, torch.nn.functional.silu)
    assert len(ins) == len(downs) == 3
    for e in range(3):
        assert torch.equal(ins[e], hidden)
        gate, up = (hidden @ gate_up[e].t()).chunk(2, dim=-1)
        torch.testing.assert_close(downs[e], torch.nn.functional.silu(gate) * up)
    assert "all tokens" in moe_calibration_note()


def test_routed_policy_and_mask() -> None:
    top = torch.tensor([[0, 2], [2, 1], [0, 2]])
    mask = expert_token_mask(top, 4)
    assert mask.tolist() == [
        [True, False, True],
        [False, True, False],
        [True, True, True],
        [False, False, False],
    ]
    hidden = torch.arange(6.0).reshape(3, 2)
    ins, downs = expert_inputs(hidden, torch.ones(4, 4, 2), torch.relu, policy="routed",
                               top_k_index=top)  # fmt: skip
    assert [t.shape[0] for t in ins] == [2, 1, 3, 0]
    assert downs[3].shape == (0, 2)
    with pytest.raises(ValueError, match="top_k_index"):
        expert_inputs(hidden, torch.ones(4, 4, 2), torch.relu, policy="routed")
    with pytest.raises(ValueError, match="num_experts"):
        expert_token_mask(top, 2)
