"""The explicit registry of passes by name (recipes and ``--method`` resolve here)."""

from __future__ import annotations

from typing import Any

from ptq.pipeline import Pass

WEIGHT_METHODS = ("rtn", "gptq", "adaround", "adaquant", "zeroquant_fp")


def pass_table() -> dict[str, tuple[type, type]]:
    """Every pass a recipe can name: ``name -> (pass class, config class)``."""
    from ptq.passes.act_calibration import ActCalibrationConfig, ActCalibrationPass
    from ptq.passes.adaptive import (
        AdaQuantPass,
        AdaQuantPassConfig,
        AdaRoundPass,
        AdaRoundPassConfig,
    )
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

    table = {k: v for k, v in pass_table().items() if k in WEIGHT_METHODS}
    if method not in table:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(sorted(table))}")
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ValueError(f"method option {pair!r} is not KEY=VALUE")
        out[key] = _scalar(text.strip())
    build_config(table[method][1], out, f"--method {method}")
    return out
