"""RTN: nearest and seeded stochastic rounding, and the steps it records in the plan."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from ptq.formats import INT4, PerGroup, QuantFormat
from ptq.passes.rtn import RTNConfig, RTNPass
from ptq.pipeline import PassContext, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.qlinear import QuantLinear
from ptq.scheme import Scheme
from ptq.steps import apply_steps

W4 = Scheme(name="w4", weight=QuantFormat(INT4, PerGroup(32)))


def _run(model: LlamaForCausalLM, rounding: str, seed: int) -> tuple[dict, PassContext, object]:
    plan = build_plan(model, W4)
    ctx = PassContext(seed=seed, progress=False)
    Pipeline([RTNPass(RTNConfig(rounding=rounding))]).run(  # type: ignore[arg-type]
        QuantState(model=model, plan=plan), ctx
    )
    codes = {
        n: m.qweight.codes.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)
    }
    return codes, ctx, plan


def test_stochastic_rounding_is_seeded_unbiased_and_within_one_step(
    tiny_lm: Callable[..., LlamaForCausalLM],
) -> None:
    fp = {
        n: m.weight.detach().clone() for n, m in tiny_lm().named_modules() if hasattr(m, "weight")
    }
    nearest, _, _ = _run(tiny_lm(), "nearest", 0)
    a, _, _ = _run(tiny_lm(), "stochastic", 0)
    b, _, _ = _run(tiny_lm(), "stochastic", 0)
    c, _, _ = _run(tiny_lm(), "stochastic", 1)
    assert nearest.keys() == a.keys() and len(a) == 14
    assert all(torch.equal(a[n], b[n]) for n in a)  # same seed: same codes
    assert any(not torch.equal(a[n], c[n]) for n in a)  # another seed: other codes
    # same scales as nearest (the rule does not depend on rounding): codes differ by <= 1
    assert all(int((a[n].int() - nearest[n].int()).abs().max()) <= 1 for n in a)
    assert sum(int((a[n] != nearest[n]).sum()) for n in a) > 0
    # unbiased: the mean signed error of stochastic codes is far smaller than its mean
    # absolute error (nearest rounding's errors are also centred, but each is smaller)
    model = tiny_lm()
    _run(model, "stochastic", 0)
    errs = torch.cat(
        [
            (m.weight - fp[n]).reshape(-1)
            for n, m in model.named_modules()
            if isinstance(m, QuantLinear)
        ]
    )
    assert float(errs.mean().abs()) < 0.02 * float(errs.abs().mean())


def test_plan_records_rounding_and_method(tiny_lm: Callable[..., LlamaForCausalLM]) -> None:
    _, ctx, plan = _run(tiny_lm(), "stochastic", 0)
    apply_steps(plan, ctx.records)  # type: ignore[arg-type]
    layers = plan.layers.values()  # type: ignore[attr-defined]
    assert all(lp.method == "rtn" and lp.rounding == "stochastic" for lp in layers)
    assert all(lp.to_dict()["rounding"] == "stochastic" for lp in layers)
    _, ctx, plan = _run(tiny_lm(), "nearest", 0)
    apply_steps(plan, ctx.records)  # type: ignore[arg-type]
    assert all(lp.rounding == "nearest" for lp in plan.layers.values())  # type: ignore[attr-defined]


def test_bad_rounding_mode() -> None:
    with pytest.raises(ValueError, match="rounding"):
        RTNConfig(rounding="up")  # type: ignore[arg-type]
