"""Capture and discovery on tiny random-init models of every architecture family.

All capture one block with ``torch.export`` (none falls back to ``symbolic_trace``);
MoE experts are unfused first. EfficientNet-Lite0 (real weights) is exported whole.
"""

from __future__ import annotations

from functools import cache

import pytest
from tiny_archs import ARCHS, tiny_model
from torch import nn

from ptq.frontend.blocks import find_blocks
from ptq.frontend.capture import Capture, capture
from ptq.frontend.experts import all_tokens, unfuse_experts
from ptq.frontend.quantizable import Discovery, discover, is_hf_conv1d
from ptq.plan import build_plan
from ptq.scheme import get_scheme

BLOCK_PATHS = {
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "bert": "encoder.layer",
}


@cache
def analysed(arch: str) -> tuple[nn.Module, Capture, Discovery]:
    model = tiny_model(arch)
    unfuse_experts(model)
    with all_tokens(model):
        cap = capture(model)
    return model, cap, discover(model, captured=cap)


def weight_modules(model: nn.Module) -> set[str]:
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    return {n for n, m in model.named_modules() if isinstance(m, kinds) or is_hf_conv1d(m)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_capture_one_block_with_export(arch: str) -> None:
    model, cap, _ = analysed(arch)
    path = BLOCK_PATHS.get(arch, "model.layers")
    found = find_blocks(model)
    assert found is not None and found[0] == path
    assert cap.block_path == path
    assert cap.block_groups == {0: [0, 1]}
    assert cap.methods == {f"{path}.0": "export"}
    assert not cap.failures


@pytest.mark.parametrize("arch", list(ARCHS))
def test_discovery_finds_every_weight(arch: str) -> None:
    model, _, disc = analysed(arch)
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


def test_mixtral_experts_are_linears_and_the_router_is_kept() -> None:
    model, _, disc = analysed("mixtral")
    experts = "model.layers.0.mlp.experts"
    for e in range(4):
        for leaf, shape in (("w1", (96, 64)), ("w3", (96, 64)), ("w2", (64, 96))):
            op = disc.ops[f"{experts}.{e}.{leaf}"]
            assert (op.kind, op.out_features, op.in_features) == ("linear", *shape)
    assert "MixtralTopKRouter" in disc.skipped["model.layers.1.mlp.gate"]
    plan = build_plan(model, get_scheme("w4a16"))
    assert plan.skipped["model.layers.1.mlp.gate"] == "router: kept in high precision"
    assert f"{experts}.3.w2" in plan.layers


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
    model, cap, _ = analysed("llama")
    full = discover(model, captured=cap, include_embeddings=True, include_matmul=True)
    assert full.ops["model.embed_tokens"].kind == "embedding"
    sdpa = [op for op in full.of_kind("matmul") if op.name.startswith("model.layers.1.")]
    assert len(sdpa) == 1 and sdpa[0].in_features == 16  # head_dim
