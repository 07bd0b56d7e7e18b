"""BitAllocationPass on a tiny Llama: plan rewrite within budget, export, reload."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ptq.api as api
from ptq.models.quantized_loader import load_quantized_model
from ptq.models.source import load_fp_model, resolve_model
from ptq.passes.allocation import InfeasibleBudgetError, candidate_bytes, parse_candidates
from ptq.passes.bit_allocation import (
    AllocatedLoRCPass,
    BitAllocationConfig,
    BitAllocationPass,
    tied_groups,
)
from ptq.passes.rtn import RTNPass
from ptq.pipeline import PassContext, Pipeline, QuantState
from ptq.plan import QuantPlan, build_plan
from ptq.qlinear import QuantLinear
from ptq.scheme import get_scheme

CANDS = "int8_channel,int4_g32,int3_g32,fp16"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(tiny: Path, tmp: Path, **cfg: Any) -> tuple[nn.Module, PassContext, QuantPlan]:
    net, _ = load_fp_model(resolve_model(str(tiny), quiet=True))
    plan = build_plan(net, get_scheme("w4a16"))
    ctx = PassContext(progress=False)
    ctx.calibration = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    config = BitAllocationConfig(
        candidates=CANDS,
        estimator="hessian",
        samples=4,
        seqlen=32,
        cache_dir=tmp,
        **cfg,
    )
    Pipeline([BitAllocationPass(config)]).run(QuantState(net, plan), ctx)
    return net, ctx, plan


def test_pass_rewrites_plan_within_budget(tiny_llama: Path, tmp_path: Path) -> None:
    net, ctx, plan = _run(tiny_llama, tmp_path, budget="5bits")
    rec = ctx.records["allocation"]
    choice = rec["choice"]
    cands = {c.name: c for c in parse_candidates(CANDS)}
    total, weights = 0, 0
    for layer, cname in choice.items():
        lin = net.get_submodule(layer)
        assert isinstance(lin, nn.Linear)
        total += candidate_bytes(cands[cname], lin.out_features, lin.in_features)
        weights += lin.weight.numel()
        if cands[cname].fmt is None:
            assert layer not in plan.layers and plan.skipped[layer] == f"allocation: {cname}"
        else:
            assert plan.layers[layer].weight == cands[cname].fmt
    assert total == rec["total_bytes"] and 8 * total / weights <= 5.0
    assert len(set(choice.values())) > 1  # a real mix at 5 bits
    for group in tied_groups(
        list(choice), (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    ):
        assert len({choice[n] for n in group}) == 1, group
    assert "lm_head" in plan.skipped  # ignored layers untouched


def test_first_last_floor_and_cache(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, ctx, _ = _run(tiny_llama, tmp_path, budget="5.5bits", min_bits_first_last=8)
    choice = ctx.records["allocation"]["choice"]
    layers = list(choice)
    assert choice[layers[0]] in ("int8_channel", "fp16")
    assert choice[layers[-1]] in ("int8_channel", "fp16")
    assert "saved to" in capsys.readouterr().out
    _, ctx2, _ = _run(tiny_llama, tmp_path, budget="6bits")  # new budget: cached table
    assert "loaded from" in capsys.readouterr().out
    assert ctx2.records["allocation"]["bits_per_weight"] <= 6.0


def test_infeasible_budget_and_order(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(InfeasibleBudgetError, match="infeasible"):
        _run(tiny_llama, tmp_path, budget="2bits")
    net, _ = load_fp_model(resolve_model(str(tiny_llama), quiet=True))
    plan = build_plan(net, get_scheme("w4a16"))
    ctx = PassContext(progress=False, calibration=torch.zeros(2, 16, dtype=torch.long))
    config = BitAllocationConfig(budget="5bits", candidates=CANDS, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="before weight quantization"):
        Pipeline([RTNPass(), BitAllocationPass(config)]).run(QuantState(net, plan), ctx)
    with pytest.raises(ValueError, match="budget"):
        BitAllocationConfig(budget="lots")


def test_export_decompresses_and_reloads(
    tiny_llama: Path, tmp_path: Path, text_file: Path, run_cli: Callable[..., Any]
) -> None:
    out = tmp_path / "out"
    cfg = BitAllocationConfig(
        budget="5bits",
        candidates=CANDS,
        estimator="hessian",
        samples=4,
        seqlen=32,
        cache_dir=tmp_path / "cache",
    )
    result = api.quantize(
        str(tiny_llama),
        "w4a16",
        output=out,
        pipeline=[BitAllocationPass(cfg), RTNPass()],
        calibration=api.CalibrationConfig(path=text_file, samples=4, seqlen=32),
        progress=False,
        log=lambda *_: None,
    )
    # the same run in memory: what the streamed output must reload to
    in_memory = api.quantize(
        str(tiny_llama),
        "w4a16",
        pipeline=[BitAllocationPass(cfg), RTNPass()],
        calibration=api.CalibrationConfig(path=text_file, samples=4, seqlen=32),
        progress=False,
        log=lambda *_: None,
    )
    assert in_memory.model is not None
    assert in_memory.records["allocation"]["choice"] == result.records["allocation"]["choice"]
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "mixed-precision"
    choice = result.records["allocation"]["choice"]
    quantized = {n for n, c in choice.items() if c != "fp16"}
    targets = [t for g in qcfg["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(quantized)
    cands = {c.name: c for c in parse_candidates(CANDS)}
    for group in qcfg["config_groups"].values():
        bits = {cands[choice[t]].fmt.bits for t in group["targets"]}
        assert bits == {group["weights"]["num_bits"]}
    assert {n for n, c in choice.items() if c == "fp16"} <= set(qcfg["ignore"])
    loaded, _ = load_quantized_model(out)
    for name in choice:
        ref, got = in_memory.model.get_submodule(name), loaded.get_submodule(name)
        assert isinstance(got, QuantLinear) == (name in quantized)
        assert isinstance(ref, nn.Linear | QuantLinear) and isinstance(got, nn.Linear | QuantLinear)
        assert torch.equal(ref.weight, got.weight), name
    res = run_cli(
        "eval", str(out), "--text", str(text_file), "--eval-tokens", "128", "--seqlen", "32", "-q"
    )
    assert res.exit_code == 0, res.output
    assert "perplexity:" in res.output


def test_lorc_allocation_is_applied(tiny_llama: Path, tmp_path: Path) -> None:
    net, _ = load_fp_model(resolve_model(str(tiny_llama), quiet=True))
    plan = build_plan(net, get_scheme("w4a16"))
    ctx = PassContext(progress=False)
    ctx.calibration = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = BitAllocationConfig(
        budget="16bits",
        candidates="int2_g32+lorc4",
        estimator="hessian",
        samples=2,
        seqlen=16,
        cache_dir=tmp_path,
    )
    Pipeline([BitAllocationPass(cfg), AllocatedLoRCPass(RTNPass())]).run(QuantState(net, plan), ctx)
    for name in plan.layers:
        m = net.get_submodule(name)
        assert isinstance(m, QuantLinear) and m.lorc_u is not None and m.lorc_u.shape[1] == 4


def test_layers_outside_blocks_keep_scheme_format(tiny_llama: Path, tmp_path: Path) -> None:
    net, _ = load_fp_model(resolve_model(str(tiny_llama), quiet=True))
    scheme = get_scheme("w4a16").with_overrides(ignore=())
    plan = build_plan(net, scheme)
    before = plan.layers["lm_head"]
    ctx = PassContext(progress=False)
    ctx.calibration = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = BitAllocationConfig(
        budget="5bits", candidates=CANDS, estimator="hessian", samples=2, seqlen=16,
        cache_dir=tmp_path,
    )  # fmt: skip
    Pipeline([BitAllocationPass(cfg)]).run(QuantState(net, plan), ctx)
    assert plan.layers["lm_head"] == before
    assert "lm_head" not in ctx.records["allocation"]["choice"]


def test_allocation_after_smoothquant_streams_and_resumes(
    deep_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pipeline split in two sweeps (SmoothQuant, then the allocation, then RTN): the
    streamed run equals the in-memory one, and a run killed in the second sweep resumes
    without redoing the first, to the same bytes."""
    import hashlib

    from ptq.calibration.checkpoint import Checkpointer
    from ptq.passes.smoothquant import SmoothQuantConfig, SmoothQuantPass

    def passes() -> list:  # type: ignore[type-arg]
        cfg = BitAllocationConfig(
            budget="5bits", candidates=CANDS, estimator="hessian", samples=4, seqlen=32,
            cache_dir=tmp_path / "cache",
        )  # fmt: skip
        return [SmoothQuantPass(SmoothQuantConfig(alpha=0.5)), BitAllocationPass(cfg), RTNPass()]

    kw = {
        "calibration": api.CalibrationConfig(samples=4, seqlen=32),
        "progress": False,
        "log": lambda *_: None,
        "checkpoint_interval_s": 0.0,
    }
    ref = tmp_path / "ref"
    api.quantize(str(deep_llama), "w4a16", output=ref, pipeline=passes(), **kw)  # type: ignore[arg-type]
    mem = api.quantize(str(deep_llama), "w4a16", pipeline=passes(), **kw)  # type: ignore[arg-type]
    loaded, _ = load_quantized_model(ref)
    assert mem.model is not None
    for name in mem.records["allocation"]["choice"]:
        assert torch.equal(mem.model.get_submodule(name).weight, loaded.get_submodule(name).weight)
    real = Checkpointer.save

    def crash(self: Checkpointer, state: dict, streams: Any) -> None:  # type: ignore[type-arg]
        real(self, state, streams)
        if state["next_block"] == 2:
            raise KeyboardInterrupt

    out = tmp_path / "o"
    monkeypatch.setattr(Checkpointer, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        api.quantize(str(deep_llama), "w4a16", output=out, pipeline=passes(), **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(Checkpointer, "save", real)
    sq_blocks: list[int] = []
    real_run = SmoothQuantPass.run_unit
    monkeypatch.setattr(
        SmoothQuantPass,
        "run_unit",
        lambda self, s, c: (sq_blocks.append(s.unit.index), real_run(self, s, c)),
    )
    api.quantize(str(deep_llama), "w4a16", output=out, pipeline=passes(), **kw)  # type: ignore[arg-type]
    assert sq_blocks == []  # the first sweep was finished and marked: not redone

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}

    assert digests(out) == digests(ref)


def test_rotation_before_allocation_keeps_the_rotated_embedding(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """Rotation then a budget, streamed: the transformed weights of the first sweep hold
    the rotated embedding (kept while released), so the output equals the in-memory run."""
    from ptq.passes.rotation import RotationPass

    def passes() -> list:  # type: ignore[type-arg]
        cfg = BitAllocationConfig(
            budget="5bits", candidates=CANDS, estimator="hessian", samples=4, seqlen=32,
            cache_dir=tmp_path / "cache",
        )  # fmt: skip
        return [RotationPass(), BitAllocationPass(cfg), RTNPass()]

    kw = {"calibration": api.CalibrationConfig(samples=4, seqlen=32), "progress": False}
    out = tmp_path / "o"
    api.quantize(str(tiny_llama), "w4a16", output=out, pipeline=passes(), log=lambda *_: None, **kw)  # type: ignore[arg-type]
    mem = api.quantize(str(tiny_llama), "w4a16", pipeline=passes(), log=lambda *_: None, **kw)  # type: ignore[arg-type]
    loaded, _ = load_quantized_model(out)
    assert mem.model is not None
    for name, t in mem.model.state_dict().items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight", "norm.weight")):
            assert torch.equal(t, loaded.state_dict()[name]), name
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(mem.model(input_ids=ids).logits, loaded(input_ids=ids).logits)
