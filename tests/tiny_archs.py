"""Tiny random-init transformers models of every supported decoder family (built offline)."""

from __future__ import annotations

import random
from pathlib import Path
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
TOKENS = {"bos_token_id": 1, "eos_token_id": 2}
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "phi3": {"pad_token_id": 0, **TOKENS},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48,
    },
    "opt": {"ffn_dim": 96, "word_embed_proj_dim": 64, "pad_token_id": 0, **TOKENS},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, **TOKENS},
    "bert": {},
}
DECODERS = [a for a in ARCHS if a != "bert"]


def tiny_config(arch: str, **overrides: Any) -> Any:
    """The transformers config of a 2-block tiny ``arch``."""
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, **{**BASE, **ARCHS[arch], **overrides})


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A 2-block random-init model of ``arch`` in eval mode (fused experts as transformers
    builds them)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    return cls.from_config(tiny_config(arch, **overrides), dtype=torch.float32).eval()


def random_norms(folder: Path) -> Path:
    """Draw a model folder's norm scales (and LayerNorm biases) away from their init, so
    folding them into the weights matters."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        if t.dim() == 1 and ("norm" in name or ".ln_" in name or name.startswith("ln_")):
            if name.endswith("weight"):
                tensors[name] = torch.rand(t.shape, generator=gen) + 0.5
            else:
                tensors[name] = 0.1 * torch.randn(t.shape, generator=gen)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "king",
    "queen",
    "lord",
    "love",
    "death",
    "night",
    "day",
    "sword",
    "crown",
    "heart",
    "blood",
    "honour",
    "time",
    "world",
    "man",
    "woman",
    "father",
    "mother",
    "son",
    "daughter",
    "speak",
    "come",
    "go",
    "know",
    "see",
    "make",
    "think",
    "good",
    "great",
]


def synthetic_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return "\n".join(lines)


def _train_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([synthetic_text(3000, seed=1)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out)


def make_tiny_model(out: Path, arch: str = "llama", seed: int = 0, **overrides: object) -> Path:
    """Write a tiny random-init model folder (config + safetensors + tokenizer).

    ``arch`` is any transformers model type; those of :data:`ARCHS` get their extra
    settings (expert counts, GPT-2/OPT names) before ``overrides``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    base: dict[str, object] = {
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }
    base.update(ARCHS.get(arch, {}) if arch != "llama" else {})
    base.update(overrides)
    config = AutoConfig.for_model(arch, **base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    _train_tokenizer(out)
    return out
