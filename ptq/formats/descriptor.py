"""A small, versioned, strict description of a :class:`QuantFormat` as plain data.

Used by the ptq on-disk layout (:mod:`ptq.formats.ptq_layout`) so a file says exactly
how to decode its codes. The body is the same allowlisted encoding as plans and
recipes (:mod:`ptq.serialization`); ``version`` guards the layout of files already
written (version 1 files, which spelled one key differently, still load).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ptq.formats.qformat import QuantFormat
from ptq.serialization import format_from_dict, format_to_dict

DESCRIPTOR_VERSION = 2
_READABLE_VERSIONS = (1, 2)


def _upgrade_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1 named a float element's display name ``name`` (now ``name_override``)."""
    element = d.get("element")
    if isinstance(element, dict) and element.get("kind") == "float" and "name" in element:
        element = {k: v for k, v in element.items() if k != "name"}
        element["name_override"] = d["element"]["name"]
        return {**d, "element": element}
    return d


def to_descriptor(fmt: QuantFormat) -> dict[str, Any]:
    """``fmt`` as a JSON-ready dict: :func:`ptq.serialization.format_to_dict` plus ``version``."""
    return {"version": DESCRIPTOR_VERSION, **format_to_dict(fmt)}


def from_descriptor(d: dict[str, Any]) -> QuantFormat:
    """Inverse of :func:`to_descriptor` (also reads version 1); rejects unknown keys, kinds
    and versions with a ``ValueError`` naming them."""
    version = d.get("version")
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"format descriptor version {version!r} is not one of {list(_READABLE_VERSIONS)}"
        )
    body = {k: v for k, v in d.items() if k != "version"}
    return format_from_dict(_upgrade_v1(body) if version == 1 else body)


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
