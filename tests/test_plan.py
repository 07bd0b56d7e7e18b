from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from ptq.formats import PerGroup
from ptq.plan import QuantPlan, build_plan
from ptq.scheme import get_scheme


def test_plan_covers_every_linear_but_ignored(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plan = build_plan(model, get_scheme("w4a8"))
    linears = [n for n, m in model.named_modules() if type(m).__name__ == "Linear"]
    assert set(plan.layers) | set(plan.skipped) == set(linears) | {"model.embed_tokens"}
    assert "embed" in plan.skipped["model.embed_tokens"]  # reported with its reason, not dropped
    assert "lm_head" in plan.skipped and "lm_head" not in plan.layers
    assert len(plan.layers) == 2 * 7
    # hidden 64 < 128: the ceiling rule picks 64; intermediate 192 = 3 * 64 -> 64
    assert all(lp.weight.granularity == PerGroup(64) for lp in plan)
    assert plan.notes and "group size 64" in plan.notes[0]


def test_plan_round_trips_json(tiny_llama: Path) -> None:
    import json

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plan = build_plan(model, get_scheme("w8a8"))
    again = QuantPlan.from_dict(json.loads(plan.to_json()))
    assert again.layers == plan.layers and again.skipped == plan.skipped


def test_override_and_errors(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    plan = build_plan(model, get_scheme("w4a16"))
    plan.override("re:.*down_proj", None)
    assert not any(n.endswith("down_proj") for n in plan.layers)
    with pytest.raises(ValueError, match="mlp.down_proj"):
        build_plan(model, get_scheme("w4a16").with_overrides(group_size=128))
    with pytest.raises(ValueError, match="no quantizable layers"):
        build_plan(model, get_scheme("w4a16").with_overrides(ignore=["re:.*"]))
