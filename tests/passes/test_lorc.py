"""LoRC: SVD factors of the quantization error; output error decreases with rank."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from ptq.formats import INT4, PerGroup, QuantFormat, quantize
from ptq.passes.lorc import FactorFormat, LoRCConfig, LoRCPass, apply_lorc, lorc_factors
from ptq.passes.rtn import RTNPass
from ptq.pipeline import PassContext, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.qlinear import QuantLinear
from ptq.scheme import ACTIVATION_FORMATS, get_scheme


def test_full_rank_factors_reconstruct_error() -> None:
    e = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    u, v = lorc_factors(e, 16, "fp32")
    assert u.shape == (24, 16) and v.shape == (16, 16)
    assert torch.allclose(u @ v, e, atol=1e-5)
    with pytest.raises(ValueError, match="rank"):
        lorc_factors(e, 17)


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
@pytest.mark.parametrize("act", [None, "fp8"])
def test_output_error_strictly_decreases_with_rank(fmt: FactorFormat, act: str | None) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g) * 0.05
    x = torch.randn(256, 128, generator=g)
    y_fp = x @ w.T
    scheme = None if act is None else ACTIVATION_FORMATS[act]
    qt = quantize(w, QuantFormat(INT4, PerGroup(32)))
    errors = []
    for rank in (0, 1, 2, 4, 8, 16, 32, 64):
        layer = QuantLinear(qt, None, scheme)
        if rank:
            u, v = lorc_factors(w - layer.weight, rank, fmt)
            layer.set_lorc(u, v)
        with torch.no_grad():
            errors.append(float((layer(x) - y_fp).pow(2).mean()))
    assert all(b < a for a, b in itertools.pairwise(errors)), errors


def test_lorc_pass_wraps_weight_pass(tiny_lm: Callable[[], LlamaForCausalLM]) -> None:
    model, plain = tiny_lm(), tiny_lm()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    plan = build_plan(model, get_scheme("w4a16"))
    ctx = PassContext()
    lorc = LoRCPass(RTNPass(), LoRCConfig(rank=4, rank_overrides=(("re:.*down_proj", 0),)))
    Pipeline([lorc]).run(QuantState(model=model, plan=plan), ctx)
    assert "weights_quantized" in ctx.facts and "lorc" in ctx.facts
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.lorc_u is not None and q.lorc_u.shape == (64, 4)
    assert model.model.layers[0].mlp.down_proj.lorc_u is None
    res = ctx.records["lorc"]["relative_residual"]
    assert all(0.0 < r < 1.0 for r in res.values())
    Pipeline([RTNPass()]).run(QuantState(model=plain, plan=plan), PassContext())
    with torch.no_grad():
        err_lorc = (model(input_ids=ids).logits - ref).pow(2).mean()
        err_rtn = (plain(input_ids=ids).logits - ref).pow(2).mean()
    assert err_lorc < err_rtn


def test_apply_lorc_needs_quantized_layer() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="not a QuantLinear"):
        apply_lorc(model, {"0": torch.zeros(8, 8)}, {"0": 2})
    with pytest.raises(ValueError, match="factor format"):
        LoRCConfig(factor_format="fp4")
