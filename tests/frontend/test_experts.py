"""MoE experts as per-expert Linears: equivalence, all-token calibration, GPTQ per expert."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_archs import make_tiny_model, tiny_model
from torch import nn

from ptq.errors import PtqInputError
from ptq.frontend.experts import ExpertMLPs, all_tokens, check_unfused, unfuse_experts


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_unfused_experts_compute_the_same(arch: str) -> None:
    model = tiny_model(arch)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    replaced = unfuse_experts(model)
    assert replaced == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = model.get_submodule(replaced[0])
    assert isinstance(experts, ExpertMLPs) and experts.num_experts == 4
    check_unfused(replaced[0], experts)
    leaves = {"mixtral": ("w1", "w3", "w2"), "qwen2_moe": ("gate_proj", "up_proj", "down_proj")}
    for leaf in leaves[arch]:
        assert isinstance(model.get_submodule(f"{replaced[0]}.3.{leaf}"), nn.Linear)
    with torch.no_grad():
        routed = model(input_ids=ids).logits
        with all_tokens(model):
            dense = model(input_ids=ids).logits
    torch.testing.assert_close(routed, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(dense, ref, rtol=0, atol=1e-5)


def test_all_tokens_reach_every_expert() -> None:
    model = tiny_model("mixtral")
    unfuse_experts(model)
    seen: dict[str, int] = {}

    def count(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            seen[name] = seen.get(name, 0) + args[0].reshape(-1, args[0].shape[-1]).shape[0]

        return hook

    for e in range(4):
        for leaf in ("w1", "w2"):
            name = f"model.layers.0.mlp.experts.{e}.{leaf}"
            model.get_submodule(name).register_forward_pre_hook(count(name))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
        routed = dict(seen)
        seen.clear()
        with all_tokens(model):
            model(input_ids=ids)
    assert sum(v for k, v in routed.items() if k.endswith("w1")) == 2 * 48  # top-2 of 48 tokens
    assert set(seen.values()) == {48}  # every expert, gate and down, on all 48 tokens


class SwappedExperts(nn.Module):
    """Fused experts whose gate_up_proj holds [up; gate] (not transformers' order)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(3, 8, 4, generator=g))
        self.down_proj = nn.Parameter(torch.randn(3, 4, 4, generator=g))
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in range(3):
            up, gate = nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            w = (weights * (index == e)).sum(-1, keepdim=True)
            out = out + nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e]) * w
        return out


def test_an_experts_forward_ptq_does_not_know_is_refused() -> None:
    holder = nn.Module()
    holder.experts = SwappedExperts()
    unfuse_experts(holder)
    experts = holder.get_submodule("experts")
    assert isinstance(experts, ExpertMLPs)
    with pytest.raises(PtqInputError, match=r"blk\.experts \(SwappedExperts\): its forward is not"):
        check_unfused("blk.experts", experts)


def test_unknown_three_d_layout_is_named() -> None:
    holder = nn.Module()
    holder.moe = nn.Module()
    holder.moe.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 4))
    holder.moe.gate_up_proj_bias = nn.Parameter(torch.zeros(2, 8))
    with pytest.raises(PtqInputError, match=r"moe \(Module\) holds 3-D expert weights"):
        unfuse_experts(holder)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("moe") / "mixtral", "mixtral")


def _routed_counts(folder: Path, ids: torch.Tensor) -> list[int]:
    from ptq.models.source import load_fp_model, resolve_model

    model, _ = load_fp_model(resolve_model(folder))
    picked: list[torch.Tensor] = []
    gate = model.get_submodule("model.layers.0.mlp.gate")
    gate.register_forward_hook(lambda _m, _a, out: picked.append(out[2].reshape(-1)))
    with torch.no_grad():
        model(input_ids=ids)
    return torch.bincount(torch.cat(picked), minlength=4).tolist()


def test_gptq_quantizes_every_expert_on_every_token(
    mixtral: Path, text_file: Path, run_cli: Callable[..., Any], tmp_path: Path
) -> None:
    """Each expert's codes differ from round-to-nearest's (GPTQ ran on it) and its
    Hessian has every calibration token, however few the router sent it."""
    from ptq.calibration.text import calibration_batches
    from ptq.models.source import load_tokenizer, resolve_model

    calib = ("--calib", str(text_file), "--calib-samples", "4", "--calib-seqlen", "32", "-q")
    outs = {}
    for method in ("gptq", "rtn"):
        outs[method] = tmp_path / method
        r = run_cli(
            "quantize", str(mixtral), "--w4a16", "--method", method, *calib, "-o", str(outs[method])
        )
        assert r.exit_code == 0, r.output
    tokens = calibration_batches(
        load_tokenizer(resolve_model(mixtral)), path=text_file, n_samples=4, seqlen=32, seed=0
    )
    n = tokens.numel()
    routed = _routed_counts(mixtral, tokens)
    assert sum(routed) == 2 * n and min(routed) < n  # top-2 routing: no expert sees them all
    gptq = load_file(str(outs["gptq"] / "model.safetensors"))
    rtn = load_file(str(outs["rtn"] / "model.safetensors"))
    records = json.loads((outs["gptq"] / "ptq_records.json").read_text())["layers"]
    for block in range(2):
        for e in range(4):
            for leaf in ("w1", "w3", "w2"):
                disk = f"model.layers.{block}.block_sparse_moe.experts.{e}.{leaf}.weight_packed"
                assert not torch.equal(gptq[disk], rtn[disk]), disk
                memory = f"model.layers.{block}.mlp.experts.{e}.{leaf}"
                assert records[memory]["method"] == "gptq"
                assert records[memory]["calibration_rows"] == n, (memory, records[memory])
    assert "model.layers.0.block_sparse_moe.gate.weight" in gptq  # router kept, not packed
    print(f"\nMixtral experts: N = {n} calibration tokens each; routed to block 0: {routed}")
