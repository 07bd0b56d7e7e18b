"""The structural model read off the captured block graph, for every decoder family."""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch
from tiny_archs import DECODERS, tiny_model
from torch import nn

from ptq.frontend.analyse import model_structure
from ptq.frontend.capture import capture
from ptq.frontend.experts import all_tokens, unfuse_experts
from ptq.frontend.norms import norm_style
from ptq.frontend.structure import LinearGroup, ModelStructure

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LLAMA: dict[str, Any] = {
    "norms": {
        "input_layernorm": ("rms", QKV),
        "post_attention_layernorm": ("rms", ("mlp.gate_proj", "mlp.up_proj")),
    },
    "value": ("self_attn.v_proj", None, 2, "self_attn.o_proj"),
    "gated": [("mlp.up_proj", None, "mlp.down_proj")],
    "writers": {"self_attn.o_proj", "mlp.down_proj"},
    "key": ("self_attn.k_proj", None, True),
}
GEMMA2: dict[str, Any] = {
    **LLAMA,
    "norms": {
        "input_layernorm": ("rms_1p", QKV),
        "pre_feedforward_layernorm": ("rms_1p", ("mlp.gate_proj", "mlp.up_proj")),
    },
    "writers": set(),
}


def _experts(gate: str, up: str, down: str, shared: bool) -> dict[str, Any]:
    readers = [f"mlp.experts.{e}.{n}" for e in range(4) for n in (gate, up)]
    return {
        **LLAMA,
        "norms": {"input_layernorm": ("rms", QKV), "post_attention_layernorm": ("rms", None)},
        "readers": set(readers)
        | {"mlp.gate"}
        | (
            {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"}
            if shared
            else set()
        ),
        "gated": [(f"mlp.experts.{e}.{up}", None, f"mlp.experts.{e}.{down}") for e in range(4)]
        + ([("mlp.shared_expert.up_proj", None, "mlp.shared_expert.down_proj")] if shared else []),
        "writers": {"self_attn.o_proj"}
        | {f"mlp.experts.{e}.{down}" for e in range(4)}
        | ({"mlp.shared_expert.down_proj"} if shared else set()),
        "routers": {"mlp.gate"} | ({"mlp.shared_expert_gate"} if shared else set()),
    }


EXPECTED: dict[str, dict[str, Any]] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": {**LLAMA, "key": ("self_attn.k_norm", None, True)},
    "gemma": {**LLAMA, "norms": {k: ("rms_1p", v[1]) for k, v in LLAMA["norms"].items()}},
    "gemma2": GEMMA2,
    "gemma3_text": {**GEMMA2, "key": ("self_attn.k_norm", None, True)},
    "phi3": {
        "norms": {
            "input_layernorm": ("rms", ("self_attn.qkv_proj",)),
            "post_attention_layernorm": ("rms", ("mlp.gate_up_proj",)),
        },
        "value": ("self_attn.qkv_proj", (96, 128), 2, "self_attn.o_proj"),
        "gated": [("mlp.gate_up_proj", (96, 192), "mlp.down_proj")],
        "writers": {"self_attn.o_proj", "mlp.down_proj"},
        "key": ("self_attn.qkv_proj", (64, 96), True),
    },
    "opt": {
        "norms": {"self_attn_layer_norm": ("layer", QKV), "final_layer_norm": ("layer", ("fc1",))},
        "value": ("self_attn.v_proj", None, 1, "self_attn.out_proj"),
        "gated": [],
        "writers": {"self_attn.out_proj", "fc2"},
        "key": ("self_attn.k_proj", None, False),
    },
    "gpt2": {
        "norms": {"ln_1": ("layer", ("attn.c_attn",)), "ln_2": ("layer", ("mlp.c_fc",))},
        "value": ("attn.c_attn", (128, 192), 1, "attn.c_proj"),
        "gated": [],
        "writers": {"attn.c_proj", "mlp.c_proj"},
        "key": ("attn.c_attn", (64, 128), False),
    },
    "mixtral": _experts("w1", "w3", "w2", shared=False),
    "qwen2_moe": _experts("gate_proj", "up_proj", "down_proj", shared=True),
}


@cache
def structure(arch: str, **config: Any) -> tuple[nn.Module, ModelStructure]:
    model = tiny_model(arch, **config)
    unfuse_experts(model)
    with all_tokens(model):
        cap = capture(model)
    return model, model_structure(model, cap)


@pytest.mark.parametrize("arch", DECODERS)
def test_block_structure(arch: str) -> None:
    want = EXPECTED[arch]
    _, s = structure(arch)
    b = s.block(1)
    p = (
        "model.decoder.layers.1."
        if arch == "opt"
        else "transformer.h.1."
        if arch == "gpt2"
        else "model.layers.1."
    )
    norms = {
        g.producer.removeprefix(p): (g.style, tuple(r.removeprefix(p) for r in g.readers))
        for g in b.norm_groups
    }
    for norm, (style, readers) in want["norms"].items():
        assert norms[norm][0] == style
        if readers is not None:
            assert norms[norm][1] == readers
    if "readers" in want:
        assert set(norms["post_attention_layernorm"][1]) == want["readers"]
    assert tuple(r.removeprefix(p) for r in b.residual_norms) == tuple(want["norms"])
    (vo,) = b.value_groups
    assert (vo.producer.removeprefix(p), vo.rows, vo.n_rep, vo.readers[0].removeprefix(p)) == want[
        "value"
    ]
    assert vo.head_dim == 16
    gated = [
        (g.producer.removeprefix(p), g.rows, g.readers[0].removeprefix(p)) for g in b.gated_groups
    ]
    assert sorted(gated) == sorted(want["gated"])
    assert {w.removeprefix(p) for w in b.writers} == want["writers"]
    (attn,) = b.attention
    assert (attn.key.module.removeprefix(p), attn.key.rows, attn.rotary) == want["key"]
    assert attn.value.module.removeprefix(p) == want["value"][0]
    assert {r.removeprefix(p) for r in b.routers} == want.get("routers", set())


@pytest.mark.parametrize("arch", [a for a in DECODERS if not a.startswith(("gemma2", "gemma3"))])
def test_rotatable_families(arch: str) -> None:
    _model, s = structure(arch)
    assert s.rotation_problems() == []
    assert s.outer.head is not None and s.outer.final_norm is not None
    assert s.hidden_size == 64


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_gemma_post_norms_block_rotation(arch: str) -> None:
    _, s = structure(arch)
    problems = s.rotation_problems()
    assert any("model.layers.0.post_attention_layernorm" in p and "Gemma" in p for p in problems)
    assert any("post_feedforward_layernorm" in p for p in problems)


def test_post_layernorm_opt_cannot_be_rotated() -> None:
    _, s = structure("opt", do_layer_norm_before=False)
    problems = s.rotation_problems()
    assert problems and any("post-norm" in p or "reads the residual stream" in p for p in problems)


def test_outer_parts() -> None:
    _, gpt2 = structure("gpt2")
    assert gpt2.outer.embeddings == ("transformer.wte", "transformer.wpe")
    assert (gpt2.outer.final_norm, gpt2.outer.final_style, gpt2.outer.tied) == (
        "transformer.ln_f", "layer", True,
    )  # fmt: skip
    _, opt = structure("opt")
    assert opt.outer.final_norm == "model.decoder.final_layer_norm"
    assert "model.decoder.embed_positions" in opt.outer.embeddings


class ScaledNorm(nn.Module):
    """A norm that is neither RMSNorm nor LayerNorm (a learned affine, no normalisation)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + 1.0


def test_norm_styles_are_probed() -> None:
    assert norm_style(nn.LayerNorm(8)) == "layer"
    assert norm_style(nn.RMSNorm(8)) == "rms"
    with torch.device("meta"):
        meta = nn.LayerNorm(8)
    assert norm_style(meta) == "layer"
    with pytest.raises(ValueError, match=r"blk\.norm \(ScaledNorm\) is neither"):
        norm_style(ScaledNorm(8), "blk.norm")


def test_group_channel_maps() -> None:
    g = LinearGroup("v", "linear", ("o",), n_rep=2, head_dim=2)
    s = torch.tensor([1.0, 2.0, 3.0, 4.0])  # two KV heads of two channels
    assert g.to_reader(s).tolist() == [1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]
    assert g.to_producer(torch.arange(8.0)).tolist() == [2.0, 3.0, 6.0, 7.0]
    assert g.prefixed("m.0.") == LinearGroup("m.0.v", "linear", ("m.0.o",), 2, 2)
