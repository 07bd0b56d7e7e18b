"""Quantization schemes: what to do to the weights and activations of each layer.

A :class:`Scheme` is the user-facing recipe (``--w4a8`` etc.). It holds a weight
:class:`~ptq.formats.QuantFormat`, an optional :class:`ActivationScheme` and the
``ignore`` patterns. The same frozen dataclasses back the CLI, the Python API and the
recipe files; ``to_dict``/``from_dict`` are versioned and reject unknown keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

from ptq.formats import (
    FP8_E4M3,
    FP8_E5M2,
    INT4,
    INT8,
    ElementFormat,
    FloatFormat,
    IntFormat,
    PerChannel,
    PerGroup,
    QuantFormat,
    largest_pow2_divisor,
)
from ptq.serialization import element_from_dict, element_to_dict, format_from_dict, format_to_dict

SCHEME_VERSION = 1
MIN_CEILING_GROUP = 16


@dataclass(frozen=True, kw_only=True)
class ActivationScheme:
    """How a layer's input activations are quantized.

    Args:
        element: Element format (INT8, FP8 E4M3/E5M2).
        granularity: ``token`` (one scale per row of the flattened input) or ``tensor``.
        dynamic: Scales computed at run time from each input (True) or calibrated (False).
        symmetric: Integer formats only; asymmetric adds a zero point.
    """

    element: ElementFormat
    granularity: Literal["token", "tensor"] = "token"
    dynamic: bool = True
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.granularity not in ("token", "tensor"):
            raise ValueError(
                f"activation granularity must be 'token' or 'tensor', not {self.granularity!r}"
            )
        if self.granularity == "token" and not self.dynamic:
            raise ValueError("per-token activation scales must be dynamic")
        if not self.symmetric and not isinstance(self.element, IntFormat):
            raise ValueError("asymmetric activations need an integer element format")

    def to_dict(self) -> dict[str, Any]:
        return {
            "element": element_to_dict(self.element),
            "granularity": self.granularity,
            "dynamic": self.dynamic,
            "symmetric": self.symmetric,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActivationScheme:
        _reject_unknown(data, {"element", "granularity", "dynamic", "symmetric"}, "activation")
        return cls(
            element=element_from_dict(data["element"]),
            granularity=data.get("granularity", "token"),
            dynamic=bool(data.get("dynamic", True)),
            symmetric=bool(data.get("symmetric", True)),
        )


@dataclass(frozen=True, kw_only=True)
class Scheme:
    """A whole-model quantization scheme.

    Args:
        name: Display name (``w4a8`` ...).
        weight: Weight format; a :class:`PerGroup` size is a *ceiling* when
            ``group_size_is_ceiling`` (presets), else it must divide every layer.
        activation: Activation quantization, or None for weight-only.
        ignore: Module names or ``re:`` regexes left in floating point.
        group_size_is_ceiling: See ``weight``.
    """

    name: str
    weight: QuantFormat
    activation: ActivationScheme | None = None
    ignore: tuple[str, ...] = ("lm_head",)
    group_size_is_ceiling: bool = True

    def is_ignored(self, module_name: str) -> bool:
        return matches_any(module_name, self.ignore)

    def weight_format_for(self, module_name: str, in_features: int) -> QuantFormat:
        """The weight format for one layer, resolving the group-size ceiling rule.

        Raises:
            ValueError: An explicit group size does not divide ``in_features``.
        """
        gran = self.weight.granularity
        if not isinstance(gran, PerGroup) or in_features % gran.size == 0:
            return self.weight
        if not self.group_size_is_ceiling:
            raise ValueError(
                f"group size {gran.size} does not divide the input size {in_features} of "
                f"{module_name}; pick a divisor or drop --group-size to use the preset rule"
            )
        size = largest_pow2_divisor(in_features, gran.size)
        if size < MIN_CEILING_GROUP:
            raise ValueError(
                f"{module_name}: no power-of-two group size >= {MIN_CEILING_GROUP} divides "
                f"its input size {in_features}; add it to --ignore or choose per-channel"
            )
        return self.weight.with_granularity(PerGroup(size))

    def with_overrides(
        self,
        *,
        weight: QuantFormat | None = None,
        activation: ActivationScheme | Literal["keep"] | None = "keep",
        ignore: Iterable[str] | None = None,
        group_size: int | None = None,
    ) -> Scheme:
        """A copy with parts replaced (the CLI's ``--weight-format`` etc.)."""
        new = self
        if weight is not None:
            new = replace(new, weight=weight)
        if activation != "keep":
            new = replace(new, activation=activation)
        if ignore is not None:
            new = replace(new, ignore=tuple(ignore))
        if group_size is not None:
            new = replace(
                new,
                weight=new.weight.with_granularity(PerGroup(group_size)),
                group_size_is_ceiling=False,
            )
        return new

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SCHEME_VERSION,
            "name": self.name,
            "weight": format_to_dict(self.weight),
            "activation": None if self.activation is None else self.activation.to_dict(),
            "ignore": list(self.ignore),
            "group_size_is_ceiling": self.group_size_is_ceiling,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scheme:
        keys = {"version", "name", "weight", "activation", "ignore", "group_size_is_ceiling"}
        _reject_unknown(data, keys, "scheme")
        if data.get("version", SCHEME_VERSION) != SCHEME_VERSION:
            raise ValueError(f"scheme version {data['version']} is not supported")
        act = data.get("activation")
        return cls(
            name=str(data.get("name", "custom")),
            weight=format_from_dict(data["weight"]),
            activation=None if act is None else ActivationScheme.from_dict(act),
            ignore=tuple(data.get("ignore", ("lm_head",))),
            group_size_is_ceiling=bool(data.get("group_size_is_ceiling", True)),
        )


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True if ``name`` equals a pattern, ends with ``.pattern``, or matches ``re:REGEX``."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.fullmatch(pattern[3:], name):
                return True
        elif name == pattern or name.endswith("." + pattern):
            return True
    return False


def _reject_unknown(data: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown {what} key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


LOW_BIT_RULE_BITS = 4
"""Signed INT weights of at most this many bits get :func:`best_scale_rule`'s rule."""


def best_scale_rule(fmt: QuantFormat) -> QuantFormat:
    """``fmt`` with the best measured scale rule where the rule is ``amax`` and can change.

    For symmetric single-level signed INT weights of <= 4 bits that is ``full_range``
    (``s = v* / -2^(b-1)``: all 2^b levels in use). SmolLM2-135M INT4 g64 RTN on 8192
    held-out tokens: amax 43.32, span (compressed-tensors' ``amax / 7.5``) 41.79,
    full-range 37.05 (benchmarks/results/rounding_smollm2.md). 8-bit weights keep
    ``amax`` (the rules are within 0.01 perplexity there). Other formats are returned
    unchanged.
    """
    el = fmt.element
    if (
        fmt.scale_rule != "amax"
        or not isinstance(el, IntFormat)
        or not el.signed
        or el.restricted
        or el.bits > LOW_BIT_RULE_BITS
        or not fmt.symmetric
        or fmt.global_scale
        or fmt.channel_scale
        or fmt.scale_format not in ("fp32", "fp16", "bf16")
    ):
        return fmt
    return replace(fmt, scale_rule="full_range")


_FP8_TOKEN = ActivationScheme(element=FP8_E4M3)
_INT8_TOKEN = ActivationScheme(element=INT8)

PRESETS: dict[str, Scheme] = {
    "w4a16": Scheme(name="w4a16", weight=best_scale_rule(QuantFormat(INT4, PerGroup(128)))),
    "w4a8": Scheme(
        name="w4a8",
        weight=best_scale_rule(QuantFormat(INT4, PerGroup(128))),
        activation=_FP8_TOKEN,
    ),
    "w8a8": Scheme(name="w8a8", weight=QuantFormat(INT8, PerChannel()), activation=_INT8_TOKEN),
    "fp8": Scheme(name="fp8", weight=QuantFormat(FP8_E4M3, PerChannel()), activation=_FP8_TOKEN),
    "w8a16": Scheme(name="w8a16", weight=QuantFormat(INT8, PerChannel())),
}

ACTIVATION_FORMATS: dict[str, ActivationScheme | None] = {
    "none": None,
    "fp8": _FP8_TOKEN,
    "fp8_e4m3": _FP8_TOKEN,
    "fp8_e5m2": ActivationScheme(element=FP8_E5M2),
    "int8": _INT8_TOKEN,
    "int8_asym": ActivationScheme(element=INT8, symmetric=False),
    "fp8_tensor_static": ActivationScheme(element=FP8_E4M3, granularity="tensor", dynamic=False),
    "int8_tensor_static": ActivationScheme(element=INT8, granularity="tensor", dynamic=False),
}


def get_scheme(name: str) -> Scheme:
    """A preset scheme by name; the error lists the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown scheme {name!r}; valid: {', '.join(sorted(PRESETS))}") from None


def get_activation(name: str) -> ActivationScheme | None:
    try:
        return ACTIVATION_FORMATS[name]
    except KeyError:
        valid = ", ".join(sorted(ACTIVATION_FORMATS))
        raise ValueError(f"unknown activation format {name!r}; valid: {valid}") from None


__all__ = [
    "ACTIVATION_FORMATS",
    "PRESETS",
    "ActivationScheme",
    "FloatFormat",
    "Scheme",
    "get_activation",
    "get_scheme",
    "matches_any",
]
