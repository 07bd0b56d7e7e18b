from pathlib import Path

import pytest

from ptq.errors import PtqInputError
from ptq.passes.gptq import GPTQPass
from ptq.passes.lorc import LoRCPass
from ptq.passes.smoothquant import SmoothQuantPass
from ptq.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_example_recipe_builds_the_pipeline() -> None:
    recipe = load_recipe(ROOT / "examples" / "w4a8_gptq_lorc.yaml")
    assert recipe.scheme is not None and recipe.scheme.name == "w4a8"
    kinds = [type(p) for p in recipe.pipeline.passes]
    assert kinds == [SmoothQuantPass, LoRCPass]
    lorc = recipe.pipeline.passes[1]
    assert isinstance(lorc.inner, GPTQPass) and lorc.inner.config.act_order  # type: ignore[attr-defined]
    assert recipe.calibration == {"samples": 64, "seqlen": 256}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"passes": ["gptq"], "sceme": "w4a8"}, "sceme"),
        ({"passes": [{"gptq": {"percdamp": "high"}}]}, "percdamp"),
        ({"passes": [{"gptq": {"dampness": 0.1}}]}, "dampness"),
        ({"passes": ["magic"]}, "unknown pass 'magic'"),
        ({"passes": []}, "non-empty"),
        ({"passes": ["lorc"]}, "wraps the pass before"),
        ({"passes": ["gptq"], "calibration": {"samples": "many"}}, "calibration.samples"),
        ({"passes": ["gptq"], "scheme": "w9a9"}, "unknown scheme"),
        ({"passes": [{"gptq": {"act_order": 1}}]}, "act_order"),
        ({"version": 2, "passes": ["gptq"]}, "version"),
    ],
)
def test_bad_recipes_are_refused_with_the_key(data: dict, needle: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(PtqInputError, match=needle):
        parse_recipe(data)
