"""QuantPlan: the per-layer decision, editable, serialisable, printed by ``ptq plan``.

The plan maps each quantizable module name to a :class:`LayerPlan` (weight format after
the group-size rule, activation scheme, algorithm) or records why it is skipped. A
mixed-precision allocation is just a plan whose layers carry different formats.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from torch import nn

from ptq.formats import PerGroup, QuantFormat
from ptq.scheme import ActivationScheme, Scheme, matches_any
from ptq.serialization import format_from_dict, format_to_dict

if TYPE_CHECKING:
    from ptq.frontend.structure import ModelStructure

PLAN_VERSION = 1
SUPPORTED_KINDS = ("linear", "conv1d_hf")
"""Layer kinds ``build_plan`` plans by default: those every exporter writes."""
IN_MEMORY_KINDS = (*SUPPORTED_KINDS, "conv2d", "conv1d")
"""Layer kinds the weight passes quantize (a model kept in memory: convolutions too)."""


@dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """What happens to one layer.

    ``method`` is the steps that changed its weight, joined by ``+`` (``awq+gptq``;
    after a run, what actually ran: :mod:`ptq.steps`); ``rounding`` how its codes were
    rounded (``nearest``, or ``stochastic`` for ``--rounding stochastic``).
    """

    name: str
    in_features: int
    out_features: int
    weight: QuantFormat
    activation: ActivationScheme | None
    method: str = "rtn"
    rounding: str = "nearest"

    @property
    def group_size(self) -> int | None:
        g = self.weight.granularity
        return g.size if isinstance(g, PerGroup) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "weight": format_to_dict(self.weight),
            "activation": None if self.activation is None else self.activation.to_dict(),
            "method": self.method,
            "rounding": self.rounding,
        }

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> LayerPlan:
        act = data.get("activation")
        return cls(
            name=name,
            in_features=int(data["in_features"]),
            out_features=int(data["out_features"]),
            weight=format_from_dict(data["weight"]),
            activation=None if act is None else ActivationScheme.from_dict(act),
            method=str(data.get("method", "rtn")),
            rounding=str(data.get("rounding", "nearest")),
        )


@dataclass
class QuantPlan:
    """Per-layer decisions plus the layers left alone and why.

    ``structure`` is the model's structural model found on the same capture
    (:mod:`ptq.frontend.structure`), carried for the passes; it is not serialised.
    """

    scheme: Scheme
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    structure: ModelStructure | None = field(default=None, compare=False, repr=False)

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "scheme": self.scheme.to_dict(),
            "layers": {n: lp.to_dict() for n, lp in self.layers.items()},
            "skipped": dict(self.skipped),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantPlan:
        unknown = set(data) - {"version", "scheme", "layers", "skipped", "notes"}
        if unknown:
            raise ValueError(f"unknown plan key(s) {sorted(unknown)}")
        return cls(
            scheme=Scheme.from_dict(data["scheme"]),
            layers={n: LayerPlan.from_dict(n, d) for n, d in data.get("layers", {}).items()},
            skipped=dict(data.get("skipped", {})),
            notes=list(data.get("notes", [])),
        )

    def renamed(self, rename: Callable[[str], str]) -> QuantPlan:
        """This plan with every layer and skipped name passed through ``rename``."""
        return QuantPlan(
            scheme=self.scheme,
            layers={rename(n): replace(lp, name=rename(n)) for n, lp in self.layers.items()},
            skipped={rename(n): why for n, why in self.skipped.items()},
            notes=list(self.notes),
            structure=self.structure,
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def override(self, pattern: str, weight: QuantFormat | None) -> None:
        """Give every layer matching ``pattern`` (name or ``re:``) a new format, or skip it."""
        for name in list(self.layers):
            if matches_any(name, [pattern]):
                if weight is None:
                    del self.layers[name]
                    self.skipped[name] = f"override {pattern}"
                else:
                    self.layers[name] = replace(self.layers[name], weight=weight)

    def summary_rows(self) -> list[tuple[str, str, str, str]]:
        rows = []
        for lp in self:
            g = lp.weight.granularity
            gran = f"g{g.size}" if isinstance(g, PerGroup) else g.name
            act = (
                "-"
                if lp.activation is None
                else (
                    f"{lp.activation.element.name}/{lp.activation.granularity}"
                    f"/{'dyn' if lp.activation.dynamic else 'static'}"
                )
            )
            rows.append((lp.name, f"{lp.weight.element.name} {gran}", act, lp.method))
        rows += [(n, "skip", "-", why) for n, why in self.skipped.items()]
        return rows


def build_plan(
    model: nn.Module,
    scheme: Scheme,
    method: str = "rtn",
    supported_kinds: tuple[str, ...] = SUPPORTED_KINDS,
    example_inputs: tuple[Any, ...] | Mapping[str, Any] | None = None,
) -> QuantPlan:
    """Discover quantizable layers on the captured graph and resolve each one's format.

    The same capture gives the plan's :attr:`QuantPlan.structure`. Fused MoE experts are
    first split into per-expert Linears (:func:`~ptq.frontend.experts.unfuse_experts`,
    in place); routers stay in high precision. Layers the front end finds but no weight
    pass handles are listed in ``skipped`` with the reason, never silently dropped.

    ``supported_kinds``: what to plan (default: the layers the output writers handle;
    :data:`IN_MEMORY_KINDS` adds convolutions for a model kept in memory).
    ``example_inputs``: inputs for capture (default: a token batch for a transformers LM).

    Raises:
        ValueError: An explicit group size does not divide some layers (all named).
    """
    from ptq.frontend.analyse import model_structure
    from ptq.frontend.experts import unfuse_experts
    from ptq.frontend.quantizable import discover

    unfuse_experts(model)
    plan = QuantPlan(scheme=scheme)
    errors: list[str] = []
    ceilinged: dict[int, list[str]] = {}
    found = discover(model, example_inputs=example_inputs)
    plan.skipped.update(found.skipped)
    plan.notes.extend(found.notes)
    if found.capture is not None:
        plan.structure = model_structure(model, found.capture)
    routers = plan.structure.routers() if plan.structure is not None else set()
    for name in routers & set(plan.skipped):
        plan.skipped[name] = "router: kept in high precision"
    for op in found:
        if op.name in routers:
            plan.skipped[op.name] = "router: kept in high precision"
            continue
        if scheme.is_ignored(op.name):
            plan.skipped[op.name] = "ignored"
            continue
        if op.kind not in supported_kinds:
            plan.skipped[op.name] = (
                f"not quantized: {op.kind} layers have no compressed-tensors layout (a model "
                "quantized in memory, ptq.quantize(module, ...), quantizes them)"
            )
            continue
        try:
            fmt = scheme.weight_format_for(op.name, op.in_features)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if fmt is not scheme.weight and isinstance(fmt.granularity, PerGroup):
            ceilinged.setdefault(fmt.granularity.size, []).append(op.name)
        plan.layers[op.name] = LayerPlan(
            name=op.name,
            in_features=op.in_features,
            out_features=op.out_features,
            weight=fmt,
            activation=scheme.activation,
            method=method,
        )
    if errors:
        raise ValueError("; ".join(errors))
    preset = scheme.weight.granularity
    for size, names in sorted(ceilinged.items()):
        assert isinstance(preset, PerGroup)
        plan.notes.append(
            f"group size {preset.size} does not divide the input of {len(names)} layer(s) "
            f"(e.g. {names[0]}); using group size {size} there"
        )
    if not plan.layers:
        raise ValueError("no quantizable layers found (all ignored or none supported)")
    return plan
