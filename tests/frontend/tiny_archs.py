"""Tiny random-init transformers models for the front-end tests (built offline)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BASE: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "phi3": {"pad_token_id": 0},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "opt": {"ffn_dim": 96, "word_embed_proj_dim": 64},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "bert": {},
}


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    """A 2-block random-init model of ``arch`` in eval mode."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    kwargs = {**BASE, **ARCHS[arch]}
    if arch in ("gpt2", "opt") or arch == "phi3":
        kwargs.update(bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    return cls.from_config(config, dtype=torch.float32).eval()
