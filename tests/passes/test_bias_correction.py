"""Bias correction: the mean output error of activation-quantized layers shrinks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LlamaForCausalLM

from ptq.formats import INT4, PerChannel, QuantFormat
from ptq.passes._groups import tensor_attr
from ptq.passes.bias_correction import BiasCorrectionPass, output_bias_shift
from ptq.passes.rtn import RTNPass
from ptq.pipeline import PassContext, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.qlinear import QuantLinear
from ptq.scheme import ACTIVATION_FORMATS, Scheme


def test_mean_output_error_decreases(tiny_lm: Callable[[], LlamaForCausalLM]) -> None:
    model = tiny_lm()
    cal = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    scheme = Scheme(
        name="w4a8_int",
        weight=QuantFormat(INT4, PerChannel()),
        activation=ACTIVATION_FORMATS["int8"],
    )
    plan = build_plan(model, scheme)
    names = [lp.name for lp in plan]
    fp_w = {n: tensor_attr(model.get_submodule(n), "weight").detach().clone() for n in names}
    fp_b: dict[str, torch.Tensor | None] = dict.fromkeys(names)
    ctx = PassContext(calibration=cal, progress=False)
    Pipeline([RTNPass()]).run(QuantState(model=model, plan=plan), ctx)
    before = output_bias_shift(model, fp_w, fp_b, cal)

    corrected = tiny_lm()
    state = QuantState(model=corrected, plan=plan)
    ctx2 = PassContext(calibration=cal, progress=False)
    Pipeline([BiasCorrectionPass(RTNPass())]).run(state, ctx2)
    assert "bias_corrected" in ctx2.facts and "weights_quantized" in ctx2.facts
    after = output_bias_shift(corrected, fp_w, fp_b, cal)
    first = "model.layers.0.self_attn.q_proj"  # same inputs before/after: error ~ 0
    assert after[first].abs().max() < 1e-4 < before[first].abs().max()
    total_before = sum(float(v.norm()) for v in before.values())
    total_after = sum(float(v.norm()) for v in after.values())
    assert total_after < 0.5 * total_before
    q = corrected.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.bias is not None  # created where absent


def test_weight_only_layers_are_left_alone(tiny_lm: Callable[[], LlamaForCausalLM]) -> None:
    model = tiny_lm()
    cal = torch.randint(0, 320, (2, 16))
    plan = build_plan(model, Scheme(name="w4a16", weight=QuantFormat(INT4, PerChannel())))
    Pipeline([BiasCorrectionPass(RTNPass())]).run(
        QuantState(model=model, plan=plan), PassContext(calibration=cal, progress=False)
    )
    assert model.model.layers[0].self_attn.q_proj.bias is None
