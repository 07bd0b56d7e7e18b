"""Fixtures shared by the pass tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture
def tiny_lm() -> Callable[[], LlamaForCausalLM]:
    """Factory of one tiny random Llama (seed 0, 2 layers, hidden 64, fp32, eval mode).

    Every call builds the same weights, so a test can compare a quantized copy with an
    untouched one.
    """

    def make() -> LlamaForCausalLM:
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        return LlamaForCausalLM(cfg).float().eval()

    return make
