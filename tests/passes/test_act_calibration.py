"""Static activation calibration: input_scale = observed range / q_max."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from ptq.formats import INT8, PerChannel, QuantFormat
from ptq.passes.act_calibration import ActCalibrationConfig, ActCalibrationPass
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
    Pipeline([ActCalibrationPass(ActCalibrationConfig(observer="minmax"))]).run(state, ctx)
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


def _scales(model: LlamaForCausalLM, cal: torch.Tensor, cfg: ActCalibrationConfig) -> dict:
    state = QuantState(model=model, plan=build_plan(model, STATIC))
    Pipeline([RTNPass(), ActCalibrationPass(cfg)]).run(state, PassContext(calibration=cal))
    return {
        n: float(m.input_scale)
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and m.input_scale is not None
    }


@pytest.mark.parametrize("observer", ["percentile", "mse", "kl"])
def test_clipping_observers_stay_within_minmax(
    tiny_lm: Callable[[], LlamaForCausalLM], observer: str
) -> None:
    cal = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(1))
    minmax = _scales(tiny_lm(), cal, ActCalibrationConfig(observer="minmax"))
    clipped = _scales(tiny_lm(), cal, ActCalibrationConfig(observer=observer, percentile=99.0))  # type: ignore[arg-type]
    assert clipped.keys() == minmax.keys() and len(minmax) == 14
    # Block 0 sees the same inputs under both (later blocks see the earlier blocks
    # quantized with different scales).
    first = [n for n in minmax if n.startswith("model.layers.0.")]
    assert all(0 < clipped[n] <= minmax[n] * (1 + 1e-6) for n in first)
    assert any(clipped[n] < minmax[n] * 0.999 for n in first)  # something was clipped


def test_scales_are_the_observer_modules(tiny_lm: Callable[[], LlamaForCausalLM]) -> None:
    """Block 0's first layer sees the embeddings' RMSNorm output: feed the same rows to
    the observers module directly and expect the same scale."""
    from ptq.calibration.observers import KLObserver

    model = tiny_lm()
    cal = torch.randint(0, 320, (4, 16), generator=torch.Generator().manual_seed(2))
    rows: list[torch.Tensor] = []
    block = model.model.layers[0]
    handle = block.self_attn.q_proj.register_forward_pre_hook(
        lambda _m, a: rows.append(a[0].detach().reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        for batch in cal.split(8):
            model(input_ids=batch, use_cache=False)
    handle.remove()
    obs = KLObserver()
    for r in rows:
        obs.update(r)
    expected = float(obs.scale(INT8))
    got = _scales(model, cal, ActCalibrationConfig(observer="kl"))
    assert got["model.layers.0.self_attn.q_proj"] == pytest.approx(expected, rel=1e-6)


def test_contract_and_config_errors(tiny_lm: Callable[[], LlamaForCausalLM]) -> None:
    model = tiny_lm()
    plan = build_plan(model, STATIC)
    with pytest.raises(PassContractError, match="weights_quantized"):
        Pipeline([ActCalibrationPass()]).run(
            QuantState(model=model, plan=plan), PassContext(calibration=torch.zeros(1, 4).long())
        )
    with pytest.raises(ValueError, match="observer"):
        ActCalibrationConfig(observer="entropy")  # type: ignore[arg-type]
