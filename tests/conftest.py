"""Shared fixtures: tiny random-init models with a real (tiny) tokenizer, built offline."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_archs import make_tiny_model, synthetic_text


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def deep_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama folder with 4 blocks (runs that stop and resume mid-model)."""
    return make_tiny_model(tmp_path_factory.mktemp("deep") / "llama", num_hidden_layers=4)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(synthetic_text(4000, seed=7))
    return path


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for a test module: conv-heavy runs are many times slower with
    threads contending on a shared CPU, and reductions then sum in one order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def run_cli() -> Callable[..., object]:
    from click.testing import CliRunner

    from ptq.cli import main

    def run(*args: str) -> object:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    return run


def read_json(path: Path) -> dict[str, object]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


@pytest.fixture
def tiny_lm() -> Callable[..., Any]:
    """Factory of one tiny random Llama (2 layers, hidden 64, fp32, eval mode).

    ``tiny_lm(seed=0, random_norms=False, **config)``: equal arguments build equal
    weights, so a test can compare a quantized copy with an untouched one;
    ``random_norms`` draws RMSNorm scales in [0.25, 1.75] (folding them then matters);
    ``config`` overrides ``LlamaConfig`` fields (e.g. ``tie_word_embeddings``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed: int = 0, random_norms: bool = False, **config: Any) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        cfg: dict[str, Any] = dict(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = LlamaForCausalLM(LlamaConfig(**(cfg | config))).float().eval()
        if random_norms:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.copy_(torch.rand_like(p) * 1.5 + 0.25)
        return model

    return make


@pytest.fixture(scope="session")
def tiny_model_factory() -> Callable[..., Path]:
    """:func:`make_tiny_model` for tests that need other sizes (e.g. head_dim 32 for vLLM)."""
    return make_tiny_model
