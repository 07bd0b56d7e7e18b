"""Capture, discovery and pattern groups on tiny random-init models of ten architectures.

All ten capture one decoder block with ``torch.export`` (none falls back to
``symbolic_trace``); EfficientNet-Lite0 (real weights) is exported whole.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from tiny_archs import ARCHS, tiny_model
from torch import nn

from ptq.frontend.capture import Capture, capture, find_decoder_blocks
from ptq.frontend.patterns import Patterns, find_patterns
from ptq.frontend.quantizable import Discovery, discover, is_hf_conv1d

BLOCK_PATHS = {
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "bert": "encoder.layer",
}
QKV_NAMES = {
    "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "gpt2": ("attn.c_attn",),
    "phi3": ("self_attn.qkv_proj",),
}


@cache
def analysed(arch: str) -> tuple[nn.Module, Capture, Discovery, Patterns]:
    model = tiny_model(arch)
    cap = capture(model)
    return model, cap, discover(model, captured=cap), find_patterns(cap)


def weight_modules(model: nn.Module) -> set[str]:
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    return {n for n, m in model.named_modules() if isinstance(m, kinds) or is_hf_conv1d(m)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_capture_one_block_with_export(arch: str) -> None:
    model, cap, _, _ = analysed(arch)
    path = BLOCK_PATHS.get(arch, "model.layers")
    found = find_decoder_blocks(model)
    assert found is not None and found[0] == path
    assert cap.block_path == path
    assert cap.block_groups == {0: [0, 1]}
    assert cap.methods == {f"{path}.0": "export"}
    assert not cap.failures


@pytest.mark.parametrize("arch", list(ARCHS))
def test_discovery_finds_every_weight(arch: str) -> None:
    model, _, disc, _ = analysed(arch)
    expected = weight_modules(model)
    assert expected <= set(disc.ops)
    # nothing with a >= 2-D weight is silently left out
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            owner = name.rpartition(".")[0]
            assert owner in disc.ops or owner in disc.skipped or name in disc.skipped, name
    for op in disc.of_kind("linear", "conv1d_hf"):
        w2 = op.weight_2d()
        assert w2.shape == (op.out_features, op.in_features)
    from_graph = {op.name for op in disc if op.source == "export"}
    assert all(".layers." in n or ".h." in n or ".layer." in n for n in from_graph)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "mixtral", "opt"])
def test_qkv_share_the_input_norm(arch: str) -> None:
    _, cap, _, pats = analysed(arch)
    for i in (0, 1):
        prefix = f"{cap.block_path}.{i}"
        names = QKV_NAMES.get(arch, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
        qkv = tuple(f"{prefix}.{n}" for n in names)
        groups = [g for g in pats.norm_linears if set(g.linears) == set(qkv)]
        assert len(groups) == 1, pats.norm_linears
        assert "norm" in groups[0].norm.lower()
    if arch != "mixtral":
        assert any(set(g.linears) == {f"{cap.block_path}.0.mlp.gate_proj",
                                      f"{cap.block_path}.0.mlp.up_proj"}
                   for g in pats.norm_linears) or arch == "opt"  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "fused"),
    [
        ("phi3", {"self_attn.qkv_proj": 3, "mlp.gate_up_proj": 2}),
        ("gpt2", {"attn.c_attn": 3}),
        ("llama", {}),
    ],
)
def test_fused_projections(arch: str, fused: dict[str, int]) -> None:
    _, cap, disc, pats = analysed(arch)
    got = {f.linear: f.parts for f in pats.fused if f.linear.startswith(f"{cap.block_path}.0.")}
    assert got == {f"{cap.block_path}.0.{k}": v for k, v in fused.items()}
    if arch == "phi3":
        norm_groups = {g.norm.rsplit(".", 1)[1]: g.linears for g in pats.norm_linears}
        assert norm_groups["input_layernorm"] == ("model.layers.1.self_attn.qkv_proj",)
    if arch == "gpt2":
        assert disc.ops["transformer.h.0.attn.c_attn"].kind == "conv1d_hf"


@pytest.mark.parametrize(
    ("arch", "v", "o", "act"),
    [
        ("llama", "self_attn.v_proj", "self_attn.o_proj", ("mlp.gate_proj", "silu")),
        ("gemma", "self_attn.v_proj", "self_attn.o_proj", ("mlp.gate_proj", "gelu")),
        ("opt", "self_attn.v_proj", "self_attn.out_proj", ("fc1", "relu")),
        ("bert", "attention.self.value", "attention.output.dense", ("intermediate.dense", "gelu")),
        ("gpt2", "attn.c_attn", "attn.c_proj", ("mlp.c_fc", "NewGELUActivation")),
        ("phi3", "self_attn.qkv_proj", "self_attn.o_proj", ("mlp.gate_up_proj", "silu")),
    ],
)
def test_value_output_residual_and_activation(
    arch: str, v: str, o: str, act: tuple[str, str]
) -> None:
    _, cap, _, pats = analysed(arch)
    p = f"{cap.block_path}.0"
    pairs = {(x.v, x.o) for x in pats.value_output if x.v.startswith(p + ".")}
    assert pairs == {(f"{p}.{v}", f"{p}.{o}")}
    acts = {(x.linear, x.activation) for x in pats.linear_act if x.linear.startswith(p + ".")}
    assert acts == {(f"{p}.{act[0]}", act[1])}
    residuals = [r for r in pats.residuals if r.module == p or r.module.startswith(p + ".")]
    assert len(residuals) == 2
    assert f"{p}.{o}" in {r.branch for r in residuals}


def test_mixtral_fused_experts_reported_and_router_skipped() -> None:
    model, cap, disc, _ = analysed("mixtral")
    experts = "model.layers.0.mlp.experts"
    assert "fused MoE experts 4x[192, 64]" in disc.skipped[f"{experts}.gate_up_proj"]
    assert "fused MoE experts 4x[64, 96]" in disc.skipped[f"{experts}.down_proj"]
    assert "MixtralTopKRouter" in disc.skipped["model.layers.1.mlp.gate"]
    full = discover(model, captured=cap, include_experts=True)
    gu = full.ops[f"{experts}.gate_up_proj"]
    assert (gu.kind, gu.num_experts, gu.in_features, gu.out_features) == ("moe_experts", 4, 64, 192)
    w = model.get_submodule(experts).gate_up_proj
    assert isinstance(w, torch.Tensor)
    assert torch.equal(gu.weight_2d(), torch.cat(list(w.detach())))
    down = full.ops["model.layers.1.mlp.experts.down_proj"]
    assert (down.in_features, down.out_features) == (96, 64)


def test_block_capture_stops_the_forward_early() -> None:
    model = tiny_model("llama")
    calls: list[int] = []
    blocks = model.get_submodule("model.layers")
    assert isinstance(blocks, nn.ModuleList)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_a, i=i: calls.append(i))
    capture(model)
    assert 0 in calls and 1 not in calls  # block 1 never ran: capture costs one block


def test_embeddings_and_matmuls_on_request() -> None:
    model, cap, _, _ = analysed("llama")
    full = discover(model, captured=cap, include_embeddings=True, include_matmul=True)
    assert full.ops["model.embed_tokens"].kind == "embedding"
    sdpa = [op for op in full.of_kind("matmul") if op.name.startswith("model.layers.1.")]
    assert len(sdpa) == 1 and sdpa[0].in_features == 16  # head_dim
