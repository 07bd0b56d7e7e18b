"""Kernel-efficiency tables for the latency model: presets and the user's own.

The modelled batch-1 decode time of a layer is ``t = bytes / (bandwidth * eff)``, where
``eff`` is the fraction of peak memory bandwidth the kernel serving that candidate
reaches. Bytes alone (``eff = 1`` everywhere) make a latency budget a size budget in
disguise; real kernels differ. A table maps candidate names to ``eff``; keys may be
glob patterns (``int4_*``), matched in order after exact names (:meth:`LatencyModel.eff`).

Specs accepted by :func:`parse_latency_model`:

* a preset name (:data:`PRESETS`);
* a JSON file ``{"bandwidth": 4.8e12, "default": 0.3, "efficiency": {"int4_*": 0.31}}``
  (every key optional);
* inline ``"int4_*=0.31,fp8=0.41,default=0.2,bandwidth=4.8e12"``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ptq.passes.allocation.candidates import H200_BANDWIDTH, LatencyModel

H200_PTQ_FP16 = LatencyModel(
    bandwidth=H200_BANDWIDTH,
    efficiency={
        "fp16": 0.660,
        "int4_*": 0.313,
        "fp8": 0.407,
        "nvfp4": 0.205,
        "mxfp4": 0.205,
    },
    default_efficiency=0.205,
)
"""ptq's own CUDA kernels on one H200, fp16 activations, batch 1: the mean fraction of
4.8 TB/s reached over 4096x4096, 11008x4096 and 4096x11008 weights
(``benchmarks/results/gpu_kernels_h200.md``, "All rows (after)"; ``fp16`` is
``torch.matmul``; the INT4 kernel was timed at group 128 and stands for every INT4
grouping). Formats with no timed kernel (INT8, INT3) get the slowest measured value."""

PRESETS: dict[str, LatencyModel] = {
    "roofline": LatencyModel(),
    "h200-ptq-fp16": H200_PTQ_FP16,
}
"""``roofline``: every kernel at peak bandwidth (latency proportional to bytes)."""

_KEYS = ("bandwidth", "default", "efficiency")


def parse_latency_model(spec: str | None) -> LatencyModel:
    """A :class:`LatencyModel` from a preset name, a JSON file or an inline table.

    Args:
        spec: See the module docstring; ``None`` or ``""`` gives the ``roofline`` preset.

    Raises:
        ValueError: an unknown preset, unreadable/malformed JSON, a malformed inline
            entry, or a non-positive efficiency or bandwidth (the message says which).
    """
    if not spec:
        return PRESETS["roofline"]
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        return _from_json(path)
    if "=" not in spec:
        raise ValueError(
            f"kernel efficiency {spec!r} is not a preset ({', '.join(PRESETS)}), a JSON file "
            "or an inline table such as 'int4_*=0.31,fp8=0.41,default=0.2'"
        )
    table: dict[str, float] = {}
    extra: dict[str, float] = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(
                f"malformed kernel-efficiency entry {item!r} in {spec!r}; use NAME=EFF"
            )
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"kernel efficiency of {key!r} is not a number: {value!r}") from None
        (extra if key in ("bandwidth", "default") else table)[key] = number
    return _model(table, extra.get("bandwidth"), extra.get("default"), spec)


def _from_json(path: Path) -> LatencyModel:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read kernel-efficiency file {path}: {exc}") from None
    if not isinstance(data, dict) or set(data) - set(_KEYS):
        raise ValueError(f"{path}: expected a JSON object with keys among {list(_KEYS)}")
    table = data.get("efficiency", {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: 'efficiency' must map candidate names to numbers")
    return _model(table, data.get("bandwidth"), data.get("default"), str(path))


def _model(
    table: Mapping[str, object], bandwidth: object, default: object, where: str
) -> LatencyModel:
    def number(value: object, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: {what} must be a number, got {value!r}")
        return float(value)

    return LatencyModel(
        bandwidth=H200_BANDWIDTH if bandwidth is None else number(bandwidth, "bandwidth"),
        efficiency={k: number(v, f"efficiency of {k!r}") for k, v in table.items()},
        default_efficiency=1.0 if default is None else number(default, "default"),
    )
