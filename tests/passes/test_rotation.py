"""QuaRot rotation: the rotated FP model computes the same logits."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from ptq.passes.online_hadamard import has_online_hadamard
from ptq.passes.rotation import RotationConfig, RotationPass
from ptq.passes.rtn import RTNPass
from ptq.pipeline import PassContext, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.qlinear import QuantLinear
from ptq.scheme import get_scheme

TinyLM = Callable[..., LlamaForCausalLM]


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("tied", [True, False])
def test_rotated_model_same_logits(online: bool, tied: bool, tiny_lm: TinyLM) -> None:
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(0))
    model = tiny_lm(random_norms=True, tie_word_embeddings=tied)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    ctx = PassContext(seed=3)
    plan = build_plan(model, get_scheme("w8a8"))
    RotationPass(RotationConfig(online_down_proj=online)).run(
        QuantState(model=model, plan=plan), ctx
    )
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert (out - ref).abs().max() < 1e-3
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert ctx.records["rotation"]["untied_lm_head"] is tied
    assert model.config.tie_word_embeddings is False or not tied
    for layer in model.model.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.ones(64))
        assert has_online_hadamard(layer.mlp) is online
    # the embedding really changed (it is rotated)
    fresh = tiny_lm(random_norms=True, tie_word_embeddings=tied).model.embed_tokens.weight
    assert not torch.allclose(model.model.embed_tokens.weight, fresh)


def test_rotation_then_rtn_quantizes_inside_wrapper(tiny_lm: TinyLM) -> None:
    model = tiny_lm(random_norms=True, tie_word_embeddings=False)
    plan = build_plan(model, get_scheme("w4a8"))
    Pipeline([RotationPass(RotationConfig(online_down_proj=True)), RTNPass()]).run(
        QuantState(model=model, plan=plan), PassContext()
    )
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    out = model(input_ids=torch.randint(0, 320, (1, 16))).logits
    assert torch.isfinite(out).all()


def test_rotation_after_quantization_is_refused(tiny_lm: TinyLM) -> None:
    model = tiny_lm(random_norms=True, tie_word_embeddings=True)
    plan = build_plan(model, get_scheme("w8a8"))
    with pytest.raises(ValueError, match="before weight quantization"):
        Pipeline([RTNPass(), RotationPass()]).run(QuantState(model=model, plan=plan), PassContext())
