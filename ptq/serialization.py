"""Config as data: strict, allowlisted ``to_dict``/``from_dict`` for format dataclasses.

Only the classes registered here can be rebuilt from a dict; unknown keys and unknown
class names raise ``ValueError`` listing what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ptq.formats import (
    FloatFormat,
    IntFormat,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantFormat,
)

_ELEMENTS: dict[str, type] = {"int": IntFormat, "float": FloatFormat}
_GRANULARITIES: dict[str, type] = {
    "tensor": PerTensor,
    "channel": PerChannel,
    "group": PerGroup,
    "block": PerBlock,
}


def _plain(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _build(cls: type, data: dict[str, Any], what: str) -> Any:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown {what} key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ValueError(f"bad {what}: {exc}") from None


def element_to_dict(element: IntFormat | FloatFormat) -> dict[str, Any]:
    kind = "int" if isinstance(element, IntFormat) else "float"
    return {"kind": kind, **_plain(element)}


def element_from_dict(data: dict[str, Any]) -> IntFormat | FloatFormat:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _ELEMENTS:
        raise ValueError(f"element kind must be one of {sorted(_ELEMENTS)}, got {kind!r}")
    return _build(_ELEMENTS[kind], data, f"{kind} element")


def granularity_to_dict(gran: Any) -> dict[str, Any]:
    return {"kind": gran.name, **_plain(gran)}


def granularity_from_dict(data: dict[str, Any]) -> Any:
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _GRANULARITIES:
        raise ValueError(f"granularity kind must be one of {sorted(_GRANULARITIES)}, got {kind!r}")
    return _build(_GRANULARITIES[kind], data, f"{kind} granularity")


def format_to_dict(fmt: QuantFormat) -> dict[str, Any]:
    out = _plain(fmt)
    out["element"] = element_to_dict(fmt.element)
    out["granularity"] = granularity_to_dict(fmt.granularity)
    return out


def format_from_dict(data: dict[str, Any]) -> QuantFormat:
    data = dict(data)
    if "element" not in data:
        raise ValueError("a weight format needs an 'element'")
    data["element"] = element_from_dict(data["element"])
    if "granularity" in data:
        data["granularity"] = granularity_from_dict(data["granularity"])
    return _build(QuantFormat, data, "weight format")
