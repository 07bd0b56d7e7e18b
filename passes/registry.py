"""The explicit registry of passes by name (recipes and ``--method`` resolve here)."""

from __future__ import annotations

from typing import Any

from ptq.pipeline import Pass


def _weight_passes() -> dict[str, Any]:
    from ptq.passes.gptq import GPTQPass, GPTQPassConfig
    from ptq.passes.rtn import RTNConfig, RTNPass

    return {"rtn": (RTNPass, RTNConfig), "gptq": (GPTQPass, GPTQPassConfig)}


WEIGHT_METHODS = ("rtn", "gptq")


def make_weight_pass(method: str, **options: Any) -> Pass:
    """Build the weight-quantization pass for ``--method``; errors list the valid names."""
    table = _weight_passes()
    if method not in table:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(sorted(table))}")
    cls, cfg = table[method]
    return cls(cfg(**options))  # type: ignore[no-any-return]
