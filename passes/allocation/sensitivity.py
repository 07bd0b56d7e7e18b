"""Per-layer sensitivity ``dL[l, c]``: the loss increase of quantizing layer ``l`` alone
to candidate ``c`` (Hubara et al., "Improving Post Training Neural Quantization: Layer-wise
Calibration and Integer Programming", 2020, section 4: the additive loss model that makes
bit allocation an integer program).

Measuring it costs one forward pass per (layer, candidate); solving for a new budget
costs milliseconds. The table is therefore cached as versioned, strict JSON::

    {"kind": "ptq.sensitivity", "version": 1, "metric": "nll_delta", "source": "...",
     "candidates": ["int4_g128", ...],
     "layers": [{"name": "model.layers.0.self_attn.q_proj", "shape": [576, 576],
                 "loss": [0.012, null, ...]}, ...]}

``null`` marks a (layer, candidate) pair that was not measured (e.g. the group size does
not divide ``K``); the solver treats it as not allowed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptq.passes.allocation._io import atomic_write_text

KIND = "ptq.sensitivity"
VERSION = 1
_TOP_KEYS = {"kind", "version", "metric", "source", "candidates", "layers"}
_LAYER_KEYS = {"name", "shape", "loss"}


@dataclass(frozen=True, eq=False)
class SensitivityTable:
    """Layers x candidates -> loss delta, with each layer's weight shape ``(N, K)``.

    Args:
        layers: Layer (module) names, in model order.
        candidates: Candidate names (see :mod:`ptq.passes.allocation.registry`).
        shapes: ``(out_features, in_features)`` per layer.
        loss: ``[len(layers), len(candidates)]`` float64; NaN = not measured.
        metric: What the deltas measure (e.g. ``"nll_delta"``, ``"kl"``).
        source: Free text naming the model / calibration set.
    """

    layers: tuple[str, ...]
    candidates: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    loss: np.ndarray = field(repr=False)
    metric: str = "loss_delta"
    source: str = ""

    def __post_init__(self) -> None:
        _unique("layer", self.layers)
        _unique("candidate", self.candidates)
        if not self.layers or not self.candidates:
            raise ValueError("a sensitivity table needs at least one layer and one candidate")
        if len(self.shapes) != len(self.layers) or any(
            not isinstance(shape, tuple | list) for shape in self.shapes
        ):
            raise ValueError(f"need one (N, K) shape per layer, got {self.shapes!r}")
        for name, shape in zip(self.layers, self.shapes, strict=True):
            if len(shape) != 2 or any(
                isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1 for d in shape
            ):
                raise ValueError(f"layer {name!r}: shape must be two positive ints, got {shape}")
        loss = np.array(self.loss, dtype=np.float64)
        if loss.shape != (len(self.layers), len(self.candidates)):
            raise ValueError(
                f"loss has shape {loss.shape}, expected "
                f"({len(self.layers)} layers, {len(self.candidates)} candidates)"
            )
        if np.isinf(loss).any():
            bad = np.argwhere(np.isinf(loss))[0]
            raise ValueError(
                f"infinite loss delta for layer {self.layers[bad[0]]!r}, candidate "
                f"{self.candidates[bad[1]]!r}; use NaN/null for 'not measured'"
            )
        loss.setflags(write=False)
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "shapes", tuple((int(n), int(k)) for n, k in self.shapes))

    @classmethod
    def from_mapping(
        cls,
        losses: Mapping[str, Mapping[str, float]],
        shapes: Mapping[str, tuple[int, int]],
        *,
        metric: str = "loss_delta",
        source: str = "",
    ) -> SensitivityTable:
        """Build from ``{layer: {candidate: delta}}``; missing pairs become NaN."""
        layers = tuple(losses)
        missing = [name for name in layers if name not in shapes]
        if missing:
            raise ValueError(f"no shape given for layers {missing}")
        cands: list[str] = []
        for row in losses.values():
            cands.extend(c for c in row if c not in cands)
        mat = np.full((len(layers), len(cands)), np.nan)
        for i, name in enumerate(layers):
            for j, c in enumerate(cands):
                if c in losses[name]:
                    mat[i, j] = float(losses[name][c])
        return cls(layers, tuple(cands), tuple(shapes[n] for n in layers), mat, metric, source)

    @property
    def n_weights(self) -> int:
        """Total number of weights ``sum N * K`` over the layers."""
        return sum(n * k for n, k in self.shapes)

    def value(self, layer: str, candidate: str) -> float:
        """``dL[layer, candidate]`` (NaN if not measured)."""
        return float(self.loss[self.layers.index(layer), self.candidates.index(candidate)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN -> ``None``)."""
        return {
            "kind": KIND,
            "version": VERSION,
            "metric": self.metric,
            "source": self.source,
            "candidates": list(self.candidates),
            "layers": [
                {
                    "name": name,
                    "shape": list(shape),
                    "loss": [None if math.isnan(v) else float(v) for v in row],
                }
                for name, shape, row in zip(self.layers, self.shapes, self.loss, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityTable:
        """Strict inverse of :meth:`to_dict`: wrong kind/version or unknown keys raise."""
        if not isinstance(data, Mapping):
            raise ValueError(f"sensitivity data must be a JSON object, got {type(data).__name__}")
        _exact_keys("sensitivity table", data, _TOP_KEYS)
        if data["kind"] != KIND:
            raise ValueError(f"not a sensitivity table: kind {data['kind']!r} != {KIND!r}")
        if data["version"] != VERSION:
            raise ValueError(
                f"sensitivity table version {data['version']!r} is not supported (expected "
                f"{VERSION}); re-measure the sensitivities"
            )
        layers = data["layers"]
        if not isinstance(layers, list) or not isinstance(data["candidates"], list):
            raise ValueError("'layers' and 'candidates' must be lists")
        rows: list[list[float]] = []
        for entry in layers:
            _exact_keys(f"layer entry {len(rows)}", entry, _LAYER_KEYS)
            loss = entry["loss"]
            if not isinstance(loss, list) or len(loss) != len(data["candidates"]):
                raise ValueError(f"layer {entry['name']!r}: 'loss' needs one value per candidate")
            rows.append([math.nan if v is None else _number(entry["name"], v) for v in loss])
        for key in ("metric", "source"):
            if not isinstance(data[key], str):
                raise ValueError(f"'{key}' must be a string, got {data[key]!r}")
        return cls(
            layers=tuple(e["name"] for e in layers),  # names, shapes: checked in __post_init__
            candidates=tuple(data["candidates"]),
            shapes=tuple(tuple(e["shape"]) for e in layers),
            loss=np.array(rows, dtype=np.float64).reshape(len(rows), len(data["candidates"])),
            metric=data["metric"],
            source=data["source"],
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically (temporary file in the same folder, then rename)."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        atomic_write_text(Path(path), text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SensitivityTable:
        """Read a table written by :meth:`save`; errors name the file."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            return cls.from_dict(data)
        except (OSError, json.JSONDecodeError, ValueError, TypeError, KeyError) as err:
            raise ValueError(f"cannot load sensitivity table {os.fspath(path)!r}: {err}") from err


def _unique(kind: str, names: Sequence[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"{kind} names must be non-empty strings, got {n!r}")
        if n in seen:
            raise ValueError(f"duplicate {kind} name {n!r}")
        seen.add(n)


def _exact_keys(what: str, data: Any, expected: set[str]) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a JSON object")
    unknown, missing = set(data) - expected, expected - set(data)
    if unknown or missing:
        raise ValueError(f"{what}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")


def _number(layer: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"layer {layer!r}: loss values must be finite numbers or null, got {v!r}")
    return float(v)
