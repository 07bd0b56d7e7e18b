"""Static activation calibration: input_scale = observed range / q_max."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from ptq.formats import INT8, PerChannel, QuantFormat
from ptq.passes.act_calibration import (
    ActCalibrationConfig,
    ActCalibrationPass,
    percentile_absmax,
)
from ptq.passes.rtn import RTNPass
from ptq.pipeline import PassContext, PassContractError, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.qlinear import QuantLinear
from ptq.scheme import ACTIVATION_FORMATS, Scheme

STATIC = Scheme(
    name="w8a8_static",
    weight=QuantFormat(INT8, PerChannel()),
    activation=ACTIVATION_FORMATS["int8_tensor_static"],
)


def test_minmax_scales_match_observed_absmax(tiny_lm: Callable[[], LlamaForCausalLM]) -> None:
    model = tiny_lm()
    cal = torch.randint(0, 320, (6, 24), generator=torch.Generator().manual_seed(0))
    plan = build_plan(model, STATIC)
    state = QuantState(model=model, plan=plan)
    ctx = PassContext(calibration=cal, progress=False)
    Pipeline([RTNPass()]).run(state, ctx)
    with pytest.raises(ValueError, match="calibrated scale"):
        model(input_ids=cal[:1])  # static scheme without scales cannot run
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    acts = {n: m.activation for n, m in layers.items()}
    Pipeline([ActCalibrationPass()]).run(state, ctx)
    # independent observation, block by block: the earlier blocks fully quantized (with
    # their calibrated scales), this block's activation quantization off
    expected: dict[str, torch.Tensor] = {}
    for i in range(len(model.model.layers)):
        mine = {n: m for n, m in layers.items() if n.startswith(f"model.layers.{i}.")}
        for m in mine.values():
            m.activation = None
        hooks = [
            m.register_forward_pre_hook(
                lambda _m, a, n=n: expected.__setitem__(n, a[0].abs().amax())
            )
            for n, m in mine.items()
        ]
        with torch.no_grad():
            model(input_ids=cal, use_cache=False)
        for h in hooks:
            h.remove()
        for n, m in mine.items():
            m.activation = acts[n]
    for n, m in layers.items():
        assert m.input_scale is not None
        assert torch.allclose(m.input_scale, expected[n] / 127.0)
        assert m.activation is not None and not m.activation.dynamic
    assert torch.isfinite(model(input_ids=cal[:2]).logits).all()
    assert len(ctx.records["act_calibration"]["input_scale"]) == len(acts)


def test_percentile_is_at_most_minmax(tiny_lm: Callable[[], LlamaForCausalLM]) -> None:
    x = torch.randn(4000)
    x[0] = 100.0
    assert percentile_absmax(x, 99.0) < x.abs().max()
    assert percentile_absmax(x, 100.0) == x.abs().max()
    model = tiny_lm()
    cal = torch.randint(0, 320, (4, 16))
    plan = build_plan(model, STATIC)
    state = QuantState(model=model, plan=plan)
    cfg = ActCalibrationConfig(observer="percentile", percentile=99.0)
    Pipeline([RTNPass(), ActCalibrationPass(cfg)]).run(state, PassContext(calibration=cal))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    pct = {n: float(m.input_scale) for n, m in layers.items() if m.input_scale is not None}
    assert len(pct) == len(layers)
    Pipeline([ActCalibrationPass()]).run(
        state, PassContext(calibration=cal, facts={"weights_quantized"})
    )
    for n, m in layers.items():
        assert m.input_scale is not None and pct[n] <= float(m.input_scale)


def test_contract_and_config_errors(tiny_lm: Callable[[], LlamaForCausalLM]) -> None:
    model = tiny_lm()
    plan = build_plan(model, STATIC)
    with pytest.raises(PassContractError, match="weights_quantized"):
        Pipeline([ActCalibrationPass()]).run(
            QuantState(model=model, plan=plan), PassContext(calibration=torch.zeros(1, 4).long())
        )
    with pytest.raises(ValueError, match="observer"):
        ActCalibrationConfig(observer="kl")
