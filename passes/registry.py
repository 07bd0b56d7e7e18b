"""The explicit registry of passes by name (recipes and ``--method`` resolve here)."""

from __future__ import annotations

from typing import Any

from ptq.pipeline import Pass

WEIGHT_METHODS = ("rtn", "gptq", "adaround", "adaquant")


def pass_table() -> dict[str, tuple[type, type]]:
    """Every pass a recipe can name: ``name -> (pass class, config class)``."""
    from ptq.passes.adaptive import (
        AdaQuantPass,
        AdaQuantPassConfig,
        AdaRoundPass,
        AdaRoundPassConfig,
    )
    from ptq.passes.gptq import GPTQPass, GPTQPassConfig
    from ptq.passes.rtn import RTNConfig, RTNPass

    return {
        "rtn": (RTNPass, RTNConfig),
        "gptq": (GPTQPass, GPTQPassConfig),
        "adaround": (AdaRoundPass, AdaRoundPassConfig),
        "adaquant": (AdaQuantPass, AdaQuantPassConfig),
    }


def make_weight_pass(method: str, **options: Any) -> Pass:
    """Build the weight-quantization pass for ``--method``; errors list the valid names."""
    table = {k: v for k, v in pass_table().items() if k in WEIGHT_METHODS}
    if method not in table:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(sorted(table))}")
    cls, cfg = table[method]
    return cls(cfg(**options))  # type: ignore[no-any-return]
