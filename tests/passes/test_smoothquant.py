"""SmoothQuant: formula, FP invariance (with GQA v->o), and lower quantized error."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from ptq.formats import INT8, PerChannel, QuantFormat
from ptq.passes.rtn import RTNPass
from ptq.passes.smoothquant import (
    SmoothQuantConfig,
    SmoothQuantPass,
    quantized_output_error,
    smoothing_factors,
)
from ptq.pipeline import PassContext, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.scheme import ActivationScheme, get_scheme

TinyLM = Callable[..., LlamaForCausalLM]


def test_smoothing_factor_formula() -> None:
    x = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_factors(x, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert torch.allclose(s[2], torch.tensor((1e-5) ** 0.5 / 2**0.5))
    assert torch.allclose(smoothing_factors(x, w, 1.0)[:2], x[:2])


@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_fp_logits_unchanged(search: bool, kv_heads: int, tiny_lm: TinyLM) -> None:
    model = tiny_lm(random_norms=True, num_key_value_heads=kv_heads)
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(1))
    cal = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    before = model.model.layers[0].self_attn.o_proj.weight.clone()
    ctx = PassContext(calibration=cal)
    plan = build_plan(model, get_scheme("w8a8"))
    cfg = SmoothQuantConfig(search=search, search_tokens=128)
    SmoothQuantPass(cfg).run(QuantState(model=model, plan=plan), ctx)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert (out - ref).abs().max() < 1e-4
    if not search:  # v -> o was smoothed (o_proj changed), GQA head repetition handled
        assert not torch.allclose(model.model.layers[0].self_attn.o_proj.weight, before)
    assert len(ctx.records["smoothquant"]["alpha"]) == 8


def test_smoothing_reduces_quantized_error_with_outlier_channels() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :3] *= 60.0  # activation outlier channels
    w = torch.randn(96, 64, generator=g) * 0.05
    fmts = [(QuantFormat(INT8, PerChannel()), ActivationScheme(element=INT8))]
    plain = quantized_output_error(x, [w], fmts, torch.ones(64))
    s = smoothing_factors(x.abs().amax(0), w.abs().amax(0), 0.5)
    smoothed = quantized_output_error(x, [w], fmts, s)
    assert smoothed < 0.5 * plain


def test_smoothquant_then_rtn_pipeline_runs_and_refuses_after_quantization(tiny_lm: TinyLM) -> None:
    model = tiny_lm(random_norms=True)
    cal = torch.randint(0, 320, (4, 16))
    plan = build_plan(model, get_scheme("w8a8"))
    state = QuantState(model=model, plan=plan)
    Pipeline([SmoothQuantPass(), RTNPass()]).run(state, PassContext(calibration=cal))
    assert torch.isfinite(model(input_ids=cal).logits).all()
    with pytest.raises(ValueError, match="before weight quantization"):
        Pipeline([SmoothQuantPass()]).run(
            state, PassContext(calibration=cal, facts={"weights_quantized"})
        )


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantConfig(alpha=1.5)
    with pytest.raises(ValueError, match="grid"):
        SmoothQuantConfig(search=True, grid=())
