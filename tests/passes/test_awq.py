"""AWQ as a pass: exact folding, lower quantized error, determinism, composition."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from ptq.formats.names import parse_format
from ptq.passes.awq import AWQConfig, AWQPass
from ptq.passes.gptq import GPTQPass
from ptq.passes.registry import make_method_passes, method_steps, route_options
from ptq.passes.rtn import RTNPass
from ptq.pipeline import Pass, PassContext, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.scheme import Scheme
from ptq.steps import apply_steps

INT3 = Scheme(name="int3", weight=parse_format("int3_g32"), group_size_is_ceiling=False)


def _outlier_lm(tiny_lm: Callable[..., LlamaForCausalLM]) -> LlamaForCausalLM:
    """A tiny Llama whose norms make three input channels of every group large."""
    model = tiny_lm(random_norms=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p[:3] *= 15
    return model


def _tokens(seed: int, n: int = 16) -> torch.Tensor:
    return torch.randint(0, 320, (n, 32), generator=torch.Generator().manual_seed(seed))


def _run(
    model: LlamaForCausalLM, passes: list[Pass], scheme: Scheme = INT3, seed: int = 0
) -> PassContext:
    ctx = PassContext(calibration=_tokens(0), progress=False, seed=seed)
    plan = build_plan(model, scheme)
    Pipeline(passes).run(QuantState(model=model, plan=plan), ctx)
    apply_steps(plan, ctx.records)
    ctx.records["plan"] = plan
    return ctx


def test_scales_alone_leave_the_fp_model_unchanged(
    tiny_lm: Callable[..., LlamaForCausalLM],
) -> None:
    model = _outlier_lm(tiny_lm)
    ids = _tokens(1, 4)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ctx = _run(model, [AWQPass(AWQConfig(clip=False))])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    alphas = ctx.records["awq"]["alpha"]
    assert len(alphas) == 8  # 4 groups x 2 blocks
    assert any(a > 0 for a in alphas.values())  # some group was actually scaled


def test_awq_lowers_the_quantized_error_on_held_out_tokens(
    tiny_lm: Callable[..., LlamaForCausalLM],
) -> None:
    fp = _outlier_lm(tiny_lm)
    ids = _tokens(7)

    def block0_error(passes: list[Pass]) -> float:
        model = copy.deepcopy(fp)
        _run(model, passes)
        with torch.no_grad():
            a = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
            b = fp(input_ids=ids, output_hidden_states=True).hidden_states[1]
        return float((a - b).pow(2).sum() / b.pow(2).sum())

    rtn = block0_error([RTNPass()])
    scaled = block0_error([AWQPass(AWQConfig(clip=False)), RTNPass()])
    full = block0_error([AWQPass(), RTNPass()])
    assert scaled < 0.8 * rtn
    assert full < 0.8 * rtn


def test_runs_are_deterministic_and_recorded(tiny_lm: Callable[..., LlamaForCausalLM]) -> None:
    a, b = _outlier_lm(tiny_lm), _outlier_lm(tiny_lm)
    ca = _run(a, [AWQPass(), GPTQPass()])
    _run(b, [AWQPass(), GPTQPass()])
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), n
    plan = ca.records["plan"]
    assert {lp.method for lp in plan.layers.values()} == {"awq+gptq"}
    ratios = ca.records["awq"]["clip_ratio"]
    assert ratios and not any(n.endswith(("q_proj", "k_proj")) for n in ratios)
    assert all(0.55 - 1e-6 <= r <= 1.0 for r in ratios.values())


@pytest.mark.parametrize("fmt", ["nvfp4", "int4_g32_asym", "fp6_e3m2_g32", "int8_channel"])
def test_every_weight_format(tiny_lm: Callable[..., LlamaForCausalLM], fmt: str) -> None:
    scheme = Scheme(name=fmt, weight=parse_format(fmt), group_size_is_ceiling=False)
    model = _outlier_lm(tiny_lm)
    ctx = _run(model, [AWQPass(AWQConfig(grid=4)), RTNPass()], scheme)
    assert {lp.method for lp in ctx.records["plan"].layers.values()} == {"awq+rtn"}
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_tokens(3, 2)).logits).all()


def test_refuses_models_without_repeated_blocks() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    scheme = Scheme(name="int4", weight=parse_format("int4"))
    with pytest.raises(ValueError, match="repeated blocks"):
        Pipeline([AWQPass(), RTNPass()]).run(
            QuantState(model=model, plan=build_plan(model, scheme)),
            PassContext(calibration=[{"input": torch.randn(4, 16)}], progress=False),
        )


def test_method_names_and_option_routing() -> None:
    assert method_steps("awq") == ["awq", "rtn"]
    assert method_steps("awq+gptq") == ["awq", "gptq"]
    assert method_steps("gptq") == ["gptq"]
    for bad in ("gptq+awq", "awq+awq", "awq+magic", "rtn+gptq"):
        with pytest.raises(ValueError):
            method_steps(bad)
    routed = route_options("awq+gptq", {"grid": 5, "percdamp": 0.1})
    assert routed == {"awq": {"grid": 5}, "gptq": {"percdamp": 0.1}}
    with pytest.raises(ValueError, match="unknown option.*awq.*gptq"):
        route_options("awq+gptq", {"lr": 1})
    awq, gptq = make_method_passes("awq+gptq", grid=5, percdamp=0.1)
    assert isinstance(awq, AWQPass) and awq.config.grid == 5
    assert isinstance(gptq, GPTQPass) and gptq.config.percdamp == 0.1


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_blocks_are_scaled_through_the_router_and_every_expert(arch: str) -> None:
    """A MoE group (norm -> router + every expert's gate/up) inspects the MoE block and
    takes ``s_X`` from the reader that saw every token (the router); the FP model's output
    is unchanged by the folded scales."""
    from tiny_archs import tiny_model

    model = tiny_model(arch)
    ids = _tokens(1, 4)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    int4_g16 = Scheme(name="int4", weight=parse_format("int4_g16"), group_size_is_ceiling=False)
    ctx = _run(model, [AWQPass(AWQConfig(clip=False))], scheme=int4_g16)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    alphas = ctx.records["awq"]["alpha"]
    assert {f"model.layers.{i}.post_attention_layernorm" for i in (0, 1)} <= alphas.keys()
