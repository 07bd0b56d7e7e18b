"""``--method-option KEY=VALUE`` parsing against each weight method's config."""

from __future__ import annotations

import pytest

from ptq.errors import PtqInputError
from ptq.passes.registry import make_weight_pass, method_options


def test_values_are_typed_by_the_config() -> None:
    opts = method_options("adaquant", ["lr_weight=1e-4", "input-rows=4096", "learn_scales=false"])
    assert opts == {"lr_weight": 1e-4, "input_rows": 4096, "learn_scales": False}
    assert method_options("gptq", ["percdamp=1"]) == {"percdamp": 1}
    assert method_options("gptq", ["scale_mode=static"]) == {"scale_mode": "static"}
    pass_ = make_weight_pass("adaquant", **opts)
    assert pass_.config.lr_weight == 1e-4 and pass_.config.input_rows == 4096  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("method", "pair", "needle"),
    [
        ("adaquant", "lr=1", "'lr_weight'"),
        ("adaquant", "input_rows=1.5", "input_rows"),
        ("adaquant", "learn_scales=3", "learn_scales"),
        ("gptq", "scale_mode=foo", "static"),
        ("gptq", "percdamp", "KEY=VALUE"),
        ("magic", "x=1", "unknown method"),
    ],
)
def test_bad_options_are_refused(method: str, pair: str, needle: str) -> None:
    with pytest.raises((ValueError, PtqInputError)) as info:
        method_options(method, [pair])
    assert needle in str(info.value)
