"""Bias correction and statistics tuning: output mean and gain of quantized layers."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import LlamaForCausalLM

from ptq.calibration.blocks import forward_batch
from ptq.calibration.stages import split_calibration
from ptq.formats import INT3, INT4, PerChannel, QuantFormat, dequantize
from ptq.formats.presets import preset
from ptq.frontend.qconv import QuantConv2d
from ptq.passes._groups import tensor_attr
from ptq.passes.bias_correction import BiasCorrectionConfig, BiasCorrectionPass, output_moments
from ptq.passes.rtn import RTNPass
from ptq.pipeline import PassContext, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.qlinear import QuantLinear
from ptq.scheme import ACTIVATION_FORMATS, Scheme


def output_bias_shift(
    model: nn.Module,
    fp_weights: dict[str, torch.Tensor],
    fp_biases: dict[str, torch.Tensor | None],
    forwards: Sequence[Callable[[], Any]],
) -> dict[str, torch.Tensor]:
    """``mean_x (y_fp(x) - layer(x))`` [out] for each named quantized layer."""
    fp = {n: (w, fp_biases.get(n)) for n, w in fp_weights.items()}
    return {n: m.shift() for n, m in output_moments(model, fp, forwards).items()}


FIRST = "model.layers.0.self_attn.q_proj"  # sees the FP embeddings in every variant


def _forwards(model: torch.nn.Module, cal: Any) -> list[Callable[[], Any]]:
    """Whole-model calibration forwards (batches of 8, as the runner splits them)."""
    return [functools.partial(forward_batch, model, b) for b in split_calibration(cal, 8)]


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
    before = output_bias_shift(model, fp_w, fp_b, _forwards(model, cal))

    corrected = tiny_lm()
    state = QuantState(model=corrected, plan=plan)
    ctx2 = PassContext(calibration=cal, progress=False)
    Pipeline([BiasCorrectionPass(RTNPass())]).run(state, ctx2)
    assert "bias_corrected" in ctx2.facts and "weights_quantized" in ctx2.facts
    after = output_bias_shift(corrected, fp_w, fp_b, _forwards(corrected, cal))
    assert after[FIRST].abs().max() < 1e-4 < before[FIRST].abs().max()  # same inputs
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


def _layer_output_error(model: nn.Module, fp_model: nn.Module, name: str, cal: Any) -> float:
    """Relative MSE of one layer's output vs the FP model's same layer on the same batch."""
    outs: dict[str, torch.Tensor] = {}
    for key, m in (("q", model), ("fp", fp_model)):
        h = m.get_submodule(name).register_forward_hook(
            lambda _m, _a, y, key=key: outs.__setitem__(key, y.detach().float())
        )
        with torch.no_grad():
            forward_batch(m, cal)
        h.remove()
    return float((outs["q"] - outs["fp"]).pow(2).mean() / outs["fp"].pow(2).mean())


def _run(model: nn.Module, plan: Any, cal: Any, wrapper: Any) -> PassContext:
    ctx = PassContext(calibration=cal, progress=False)
    Pipeline([wrapper]).run(QuantState(model=model, plan=plan), ctx)
    return ctx


def test_gain_and_shift_lower_weight_only_error(tiny_lm: Callable[[], LlamaForCausalLM]) -> None:
    cal = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    plan = build_plan(tiny_lm(), Scheme(name="w3", weight=QuantFormat(INT3, PerChannel())))
    all_layers = {"activation_quantized_only": False}
    errors = {}
    models = {}
    for label, wrapper in {
        "rtn": RTNPass(),
        "shift": BiasCorrectionPass(RTNPass(), BiasCorrectionConfig(**all_layers)),
        "gain": BiasCorrectionPass(RTNPass(), BiasCorrectionConfig(gain=True, **all_layers)),
    }.items():
        models[label] = tiny_lm()
        ctx = _run(models[label], plan, cal, wrapper)
        errors[label] = _layer_output_error(models[label], tiny_lm(), FIRST, cal)
    assert errors["gain"] < errors["shift"] < errors["rtn"]
    record = ctx.records["bias_correction"][FIRST]
    assert record["gain_min"] < 1.0 and record["mse_reduction"] >= 0.0
    rtn_q = models["rtn"].get_submodule(FIRST)
    gained = models["gain"].get_submodule(FIRST)
    assert isinstance(rtn_q, QuantLinear) and isinstance(gained, QuantLinear)
    assert torch.equal(rtn_q.qweight.codes, gained.qweight.codes)  # only the scales move
    assert not torch.equal(rtn_q.qweight.scale, gained.qweight.scale)
    torch.testing.assert_close(gained.weight, dequantize(gained.qweight))


def test_gain_is_skipped_where_it_cannot_fold(tiny_lm: Callable[[], LlamaForCausalLM]) -> None:
    cal = torch.randint(0, 320, (2, 16))
    plan = build_plan(tiny_lm(), Scheme(name="nvfp4", weight=preset("nvfp4")))
    config = BiasCorrectionConfig(gain=True, activation_quantized_only=False)
    ctx = _run(tiny_lm(), plan, cal, BiasCorrectionPass(RTNPass(), config))
    record = ctx.records["bias_correction"][FIRST]
    assert record["gain_skipped"] == "two-level scales" and "shift_abs_mean" in record


class _TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.fc = nn.Linear(16, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(torch.relu(self.conv1(pixel_values))))
        out: torch.Tensor = self.fc(x.mean((2, 3)))
        return out


def test_convolutions_are_corrected() -> None:
    names = ["conv1", "dw", "fc"]
    scheme = Scheme(name="w3", weight=QuantFormat(INT3, PerChannel()), activation=None)
    plan = build_plan(_TinyCNN(), scheme, supported_kinds=("linear", "conv2d"))
    assert sorted(lp.name for lp in plan) == sorted(names)
    gen = torch.Generator().manual_seed(1)
    cal = [{"pixel_values": torch.randn(4, 3, 8, 8, generator=gen)} for _ in range(3)]
    config = BiasCorrectionConfig(gain=True, activation_quantized_only=False)
    rtn, corrected = _TinyCNN(), _TinyCNN()
    _run(rtn, plan, cal, RTNPass())
    ctx = _run(corrected, plan, cal, BiasCorrectionPass(RTNPass(), config))
    assert set(ctx.records["bias_correction"]) == set(names)
    dw = corrected.get_submodule("dw")
    assert isinstance(dw, QuantConv2d) and dw.conv.bias is not None  # created where absent
    fp = _TinyCNN()
    before = _layer_output_error(rtn, fp, "conv1", cal[0])
    after = _layer_output_error(corrected, fp, "conv1", cal[0])
    assert after < before
    shift = output_bias_shift(
        corrected,
        {"conv1": fp.conv1.weight.detach()},
        {"conv1": fp.conv1.bias.detach()},
        _forwards(corrected, cal),
    )
    assert shift["conv1"].abs().max() < 1e-4  # conv1 sees FP inputs: its mean now matches
