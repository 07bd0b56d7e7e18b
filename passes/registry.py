"""The explicit registry of passes by name (recipes and ``--method`` resolve here).

A ``--method`` is a weight method (``rtn``, ``gptq``, ...), optionally preceded by
transforms joined with ``+``: ``awq+gptq`` is AWQ's scales and clipping, then GPTQ's
rounding; ``awq`` alone is ``awq+rtn``. ``--method-option KEY=VALUE`` goes to the one
pass of the method whose config has ``KEY``.
"""

from __future__ import annotations

from typing import Any

from ptq.pipeline import Pass

WEIGHT_METHODS = ("rtn", "gptq", "adaround", "adaquant", "zeroquant_fp")
PRE_METHODS = ("awq",)


def pass_table() -> dict[str, tuple[type, type]]:
    """Every pass a recipe can name: ``name -> (pass class, config class)``."""
    from ptq.passes.act_calibration import ActCalibrationConfig, ActCalibrationPass
    from ptq.passes.adaptive import (
        AdaQuantPass,
        AdaQuantPassConfig,
        AdaRoundPass,
        AdaRoundPassConfig,
    )
    from ptq.passes.awq import AWQConfig, AWQPass
    from ptq.passes.bit_allocation import BitAllocationConfig, BitAllocationPass
    from ptq.passes.fold_batch_norm import FoldBatchNormConfig, FoldBatchNormPass
    from ptq.passes.gptq import GPTQPass, GPTQPassConfig
    from ptq.passes.kv_cache import KVCacheConfig, KVCachePass
    from ptq.passes.rotation import RotationConfig, RotationPass
    from ptq.passes.rtn import RTNConfig, RTNPass
    from ptq.passes.smoothquant import SmoothQuantConfig, SmoothQuantPass
    from ptq.passes.zeroquant_fp import ZeroQuantFPConfig, ZeroQuantFPPass

    return {
        "rtn": (RTNPass, RTNConfig),
        "gptq": (GPTQPass, GPTQPassConfig),
        "adaround": (AdaRoundPass, AdaRoundPassConfig),
        "adaquant": (AdaQuantPass, AdaQuantPassConfig),
        "zeroquant_fp": (ZeroQuantFPPass, ZeroQuantFPConfig),
        "awq": (AWQPass, AWQConfig),
        "smoothquant": (SmoothQuantPass, SmoothQuantConfig),
        "rotation": (RotationPass, RotationConfig),
        "act_calibration": (ActCalibrationPass, ActCalibrationConfig),
        "kv_cache": (KVCachePass, KVCacheConfig),
        "bit_allocation": (BitAllocationPass, BitAllocationConfig),
        "fold_batch_norm": (FoldBatchNormPass, FoldBatchNormConfig),
    }


def wrapper_table() -> dict[str, tuple[type, type]]:
    """Passes that wrap a weight pass: built as ``cls(inner, config)``."""
    from ptq.passes.bias_correction import BiasCorrectionConfig, BiasCorrectionPass
    from ptq.passes.lorc import LoRCConfig, LoRCPass

    return {
        "lorc": (LoRCPass, LoRCConfig),
        "bias_correction": (BiasCorrectionPass, BiasCorrectionConfig),
    }


def make_weight_pass(method: str, **options: Any) -> Pass:
    """Build the weight-quantization pass for ``--method``; errors list the valid names."""
    table = {k: v for k, v in pass_table().items() if k in WEIGHT_METHODS}
    if method not in table:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(sorted(table))}")
    cls, cfg = table[method]
    return cls(cfg(**options))


def method_steps(method: str) -> list[str]:
    """The passes a ``--method`` names, in order (``awq`` -> ``[awq, rtn]``).

    Raises:
        ValueError: an unknown part, a transform after the weight method, or two weight
            methods (the message lists the valid names).
    """
    parts = [p.strip() for p in method.split("+")]
    valid = f"valid: {', '.join(sorted(WEIGHT_METHODS))}, optionally after {'+'.join(PRE_METHODS)}+"
    if parts == list(PRE_METHODS[:1]) or parts[-1] in PRE_METHODS:
        parts.append("rtn")
    *pre, weight = parts
    if weight not in WEIGHT_METHODS or any(p not in PRE_METHODS for p in pre):
        raise ValueError(f"unknown method {method!r}; {valid} (e.g. awq+gptq)")
    if len(set(pre)) != len(pre):
        raise ValueError(f"method {method!r} names a step twice")
    return [*pre, weight]


def route_options(method: str, options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Split a method's options between its passes by their config fields.

    Raises:
        ValueError: a key no pass (or more than one) of the method has.
    """
    from dataclasses import fields

    table = pass_table()
    steps = method_steps(method)
    keys = {s: {f.name for f in fields(table[s][1])} for s in steps}
    out: dict[str, dict[str, Any]] = {s: {} for s in steps}
    for key, value in options.items():
        owners = [s for s in steps if key in keys[s]]
        if len(owners) != 1:
            allowed = "; ".join(f"{s}: {sorted(keys[s])}" for s in steps)
            if owners:
                raise ValueError(f"option {key!r} of --method {method} is ambiguous ({allowed})")
            raise ValueError(
                f"unknown option(s) [{key!r}] of --method {method}; allowed: {allowed}"
            )
        out[owners[0]][key] = value
    return out


def make_method_passes(method: str, **options: Any) -> list[Pass]:
    """The passes of ``--method`` (transforms first, the weight pass last)."""
    table = pass_table()
    return [
        table[step][0](table[step][1](**opts))
        for step, opts in route_options(method, options).items()
    ]


def _scalar(text: str) -> Any:
    """``text`` as int, float, bool or None when it reads as one, else the string."""
    words = {"true": True, "false": False, "yes": True, "no": False, "none": None, "": None}
    if text.lower() in words:
        return words[text.lower()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_options(method: str, pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` overrides of a weight method's config (``--method-option``).

    Values are read as scalars (``1e-4``, ``4096``, ``true``/``false``, ``none``, else a
    string such as ``static``) and checked like a recipe's pass options
    (:func:`ptq.recipe.build_config`: known keys, the field's type).

    Raises:
        ValueError: unknown method or a pair without ``=``.
        PtqInputError: an unknown key (the message lists the allowed ones) or a value of
            the wrong type.
    """
    from ptq.recipe import build_config

    table = pass_table()
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"method option {pair!r} is not KEY=VALUE")
        out[key] = _scalar(text.strip())
    for step, opts in route_options(method, out).items():
        build_config(table[step][1], opts, f"--method {method} ({step})")
    return out
