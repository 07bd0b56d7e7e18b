"""A small, versioned, strict description of a :class:`QuantFormat` as plain data.

Used by the ptq on-disk layout (:mod:`ptq.formats.ptq_layout`) so a file says exactly
how to decode its codes. ``to_descriptor`` / ``from_descriptor`` round-trip every
format; unknown keys and kinds are rejected with a ``ValueError`` naming them.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ptq.formats.element import ElementFormat, FloatFormat, IntFormat
from ptq.formats.granularity import Granularity, PerBlock, PerChannel, PerGroup, PerTensor
from ptq.formats.qformat import QuantFormat

DESCRIPTOR_VERSION = 1
_TOP_KEYS = {
    "version",
    "element",
    "granularity",
    "symmetric",
    "scale_format",
    "scale_rule",
    "global_scale",
    "clip",
    "name",
    "nonfinite",
    "channel_scale",
}


def _element_to_dict(el: ElementFormat) -> dict[str, Any]:
    if isinstance(el, IntFormat):
        return {"kind": "int", "bits": el.bits, "signed": el.signed, "restricted": el.restricted}
    return {
        "kind": "float",
        "exp_bits": el.exp_bits,
        "man_bits": el.man_bits,
        "bias": el.exp_bias,
        "inf_nan": el.inf_nan,
        "signed": el.signed,
        "name": el.name_override,
    }


def _strict(d: dict[str, Any], allowed: set[str], what: str) -> None:
    extra = set(d) - allowed
    if extra:
        raise ValueError(
            f"unknown {what} descriptor key(s) {sorted(extra)}; valid: {sorted(allowed)}"
        )


def _element_from_dict(d: dict[str, Any]) -> ElementFormat:
    kind = d.get("kind")
    if kind == "int":
        _strict(d, {"kind", "bits", "signed", "restricted"}, "int element")
        return IntFormat(int(d["bits"]), bool(d["signed"]), bool(d["restricted"]))
    if kind == "float":
        keys = {"kind", "exp_bits", "man_bits", "bias", "inf_nan", "signed", "name"}
        _strict(d, keys, "float element")
        return FloatFormat(
            int(d["exp_bits"]), int(d["man_bits"]), int(d["bias"]), d["inf_nan"],
            bool(d["signed"]), d.get("name"),
        )  # fmt: skip
    raise ValueError(f"unknown element kind {kind!r}; valid: int, float")


def _granularity_to_dict(g: Granularity) -> dict[str, Any]:
    if isinstance(g, PerTensor):
        return {"kind": "tensor"}
    if isinstance(g, PerChannel):
        return {"kind": "channel", "axis": g.axis}
    if isinstance(g, PerGroup):
        return {"kind": "group", "size": g.size}
    return {"kind": "block", "rows": g.rows, "cols": g.cols}


def _granularity_from_dict(d: dict[str, Any]) -> Granularity:
    kind = d.get("kind")
    if kind == "tensor":
        _strict(d, {"kind"}, "tensor granularity")
        return PerTensor()
    if kind == "channel":
        _strict(d, {"kind", "axis"}, "channel granularity")
        return PerChannel(int(d["axis"]))
    if kind == "group":
        _strict(d, {"kind", "size"}, "group granularity")
        return PerGroup(int(d["size"]))
    if kind == "block":
        _strict(d, {"kind", "rows", "cols"}, "block granularity")
        return PerBlock(int(d["rows"]), int(d["cols"]))
    raise ValueError(f"unknown granularity kind {kind!r}; valid: tensor, channel, group, block")


def to_descriptor(fmt: QuantFormat) -> dict[str, Any]:
    """``fmt`` as a JSON-ready dict (with ``version``)."""
    return {
        "version": DESCRIPTOR_VERSION,
        "element": _element_to_dict(fmt.element),
        "granularity": _granularity_to_dict(fmt.granularity),
        "symmetric": fmt.symmetric,
        "scale_format": fmt.scale_format,
        "scale_rule": fmt.scale_rule,
        "global_scale": fmt.global_scale,
        "clip": fmt.clip,
        "name": fmt.name,
        "nonfinite": fmt.nonfinite,
        "channel_scale": fmt.channel_scale,
    }


def from_descriptor(d: dict[str, Any]) -> QuantFormat:
    """Inverse of :func:`to_descriptor`; rejects unknown keys and versions."""
    _strict(d, _TOP_KEYS, "format")
    if d.get("version") != DESCRIPTOR_VERSION:
        raise ValueError(
            f"format descriptor version {d.get('version')!r} is not {DESCRIPTOR_VERSION}"
        )
    return QuantFormat(
        element=_element_from_dict(d["element"]),
        granularity=_granularity_from_dict(d["granularity"]),
        symmetric=bool(d["symmetric"]),
        scale_format=d["scale_format"],
        scale_rule=d["scale_rule"],
        global_scale=bool(d["global_scale"]),
        clip=d["clip"],
        name=str(d["name"]),
        nonfinite=d["nonfinite"],
        channel_scale=bool(d["channel_scale"]),
    )


def descriptor_tensor(fmt: QuantFormat) -> torch.Tensor:
    """The descriptor as UTF-8 JSON bytes in a uint8 tensor (storable in safetensors)."""
    text = json.dumps(to_descriptor(fmt), sort_keys=True, separators=(",", ":"))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def descriptor_from_tensor(t: torch.Tensor) -> QuantFormat:
    """Inverse of :func:`descriptor_tensor`."""
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError("a format descriptor tensor must be 1-D uint8 UTF-8 JSON")
    try:
        data = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"format descriptor is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("format descriptor JSON must be an object")
    return from_descriptor(data)
