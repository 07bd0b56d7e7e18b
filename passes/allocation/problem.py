"""The bit-allocation problem: per-(layer, candidate) loss deltas and costs, plus constraints.

Following Hubara et al. (2020, section 4), layer ``l`` takes candidate ``c`` with
``x[l, c] in {0, 1}`` and the model's loss is modelled as additive,
``L(x) = L_0 + sum_{l,c} x[l, c] * dL[l, c]``. The cost (bytes, or modelled latency)
is additive too: ``C(x) = sum_{l,c} x[l, c] * cost[l, c]``.

Constraints beyond the paper's:

* *allowed subsets*: ``x[l, c] = 0`` for candidates a layer may not take (policy such
  as "first and last layers at least 8 bits", a kernel's format list, a group size that
  does not divide ``K``, or a loss that was not measured);
* *tied groups*: layers that must share one candidate (q/k/v reading one activation
  quantizer, fused gate/up). Each group becomes one decision *unit* whose loss and cost
  are the sums over its members.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ptq.passes.allocation.budget import CostUnit
from ptq.passes.allocation.candidates import Candidate, LatencyModel, candidate_bytes
from ptq.passes.allocation.sensitivity import SensitivityTable


@dataclass(frozen=True, eq=False)
class AllocationProblem:
    """Everything a solver needs; build it with :func:`build_problem`.

    Attributes:
        layers: Layer names.
        candidates: Candidates (columns).
        loss: ``dL[l, c]`` (NaN where not measured; see ``allowed`` for the policy).
        nbytes: Exact bytes ``[l, c]`` (NaN where the candidate does not fit the layer).
        cost: The budgeted cost ``[l, c]``: ``nbytes`` or modelled seconds.
        unit: ``bytes`` or ``seconds``.
        allowed: ``[l, c]`` bool, every constraint applied (ties included).
        units: Partition of layer indices into decision units (tied groups, singletons).
        shapes: ``(N, K)`` per layer.
        seconds: Modelled latency ``[l, c]`` when built with a latency model (else None);
            lets a latency budget constrain a problem whose ``unit`` is bytes, and both
            at once (:func:`~ptq.passes.allocation.solver.solve_ilp` with two budgets).
    """

    layers: tuple[str, ...]
    candidates: tuple[Candidate, ...]
    loss: np.ndarray = field(repr=False)
    nbytes: np.ndarray = field(repr=False)
    cost: np.ndarray = field(repr=False)
    unit: CostUnit
    allowed: np.ndarray = field(repr=False)
    units: tuple[tuple[int, ...], ...]
    shapes: tuple[tuple[int, int], ...]
    seconds: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        want = (len(self.layers), len(self.candidates))
        for name in ("loss", "nbytes", "cost", "allowed", "seconds"):
            if getattr(self, name) is not None and getattr(self, name).shape != want:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {want}")
        if len(self.shapes) != len(self.layers):
            raise ValueError(f"need one shape per layer: {len(self.shapes)} != {len(self.layers)}")
        if sorted(i for u in self.units for i in u) != list(range(len(self.layers))):
            raise ValueError("units must partition the layer indices")
        if self.unit not in ("bytes", "seconds"):
            raise ValueError(f"unit must be bytes or seconds, got {self.unit!r}")
        if not self.allowed.any(axis=1).all():
            raise ValueError("every layer needs at least one allowed candidate")
        usable = ~np.isnan(self.loss) & ~np.isnan(self.cost) & ~np.isnan(self.nbytes)
        if (self.allowed & ~usable).any():
            raise ValueError("an allowed (layer, candidate) pair has a NaN loss or cost")

    @property
    def n_weights(self) -> int:
        """``sum N * K`` over the layers (the denominator of bits per weight)."""
        return sum(n * k for n, k in self.shapes)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.candidates)

    def cost_in(self, unit: CostUnit) -> np.ndarray:
        """The ``[l, c]`` cost matrix in ``unit``: ``nbytes``, or ``seconds``.

        Raises:
            ValueError: ``seconds`` asked of a problem built without a latency model.
        """
        if unit == "bytes":
            return self.nbytes
        if self.seconds is None:
            raise ValueError(
                "a latency budget needs a latency model: build the problem with "
                "latency=LatencyModel(...) (CLI: --kernel-efficiency)"
            )
        return self.seconds

    def per_unit(self, matrix: np.ndarray) -> np.ndarray:
        """``matrix [l, c]`` summed over each decision unit's members -> ``[U, C]``
        (entries a unit may not take are summed as 0; mask them with ``unit_matrices``)."""
        return np.stack(
            [np.where(self.allowed[list(u)], matrix[list(u)], 0).sum(0) for u in self.units]
        )

    def unit_matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per unit: summed loss, summed cost, allowed mask (each ``[U, C]``)."""
        ok = np.stack([self.allowed[list(u)].all(0) for u in self.units])
        return self.per_unit(self.loss), self.per_unit(self.cost), ok

    def min_cost(self, unit: CostUnit | None = None) -> float:
        """Cheapest achievable cost in ``unit`` (default: ``self.unit``): every unit at
        its cheapest allowed candidate for that cost alone."""
        _, _, ok = self.unit_matrices()
        cost = self.per_unit(self.cost if unit is None else self.cost_in(unit))
        return float(np.where(ok, cost, np.inf).min(axis=1).sum())


def build_problem(
    table: SensitivityTable,
    candidates: Sequence[Candidate],
    *,
    latency: LatencyModel | None = None,
    allowed: Mapping[str, Collection[str]] | None = None,
    tied: Sequence[Sequence[str]] = (),
    unit: CostUnit = "seconds",
) -> AllocationProblem:
    """Assemble an :class:`AllocationProblem` from measured sensitivities.

    Args:
        table: ``dL`` per (layer, candidate name) and layer shapes.
        candidates: Candidates to choose among; each name must be a table column.
        latency: Model each pair's latency with this roofline (``problem.seconds``).
        unit: With ``latency``, the primary cost (``cost``, and how bare numeric
            budgets are read): ``seconds`` (default) or ``bytes``. Without it: bytes.
        allowed: ``{layer: candidate names}`` the layer may take (others: all).
        tied: Groups of layers that must take the same candidate (overlaps are merged).

    Raises:
        ValueError: unknown layer/candidate names, or a layer / tied group left with no
            allowed candidate (the message names it and why).
    """
    names = [c.name for c in candidates]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"candidates must be a non-empty list of distinct names, got {names}")
    absent = [n for n in names if n not in table.candidates]
    if absent:
        raise ValueError(f"candidates {absent} have no sensitivities; table has {table.candidates}")
    cols = [table.candidates.index(n) for n in names]
    loss = table.loss[:, cols].copy()
    nbytes = np.full(loss.shape, np.nan)
    for i, (n, k) in enumerate(table.shapes):
        for j, cand in enumerate(candidates):
            with contextlib.suppress(ValueError):  # does not fit this shape: not allowed
                nbytes[i, j] = candidate_bytes(cand, n, k)
    seconds = None
    if latency is not None:
        seconds = nbytes / latency.bandwidth / np.array([latency.eff(n) for n in names])
    cost = nbytes.copy() if seconds is None or unit == "bytes" else seconds.copy()
    ok = ~np.isnan(loss) & ~np.isnan(nbytes)
    for i, layer in enumerate(table.layers):
        if not ok[i].any():
            raise ValueError(
                f"layer {layer!r} ({table.shapes[i][0]}x{table.shapes[i][1]}) has no candidate "
                f"that fits its shape and has a measured loss among {names}"
            )
    policy = _policy_mask(table.layers, names, allowed or {})
    for i, layer in enumerate(table.layers):
        if not (ok[i] & policy[i]).any():
            fit = [n for n, f in zip(names, ok[i], strict=True) if f]
            wanted = [n for n, p in zip(names, policy[i], strict=True) if p]
            raise ValueError(
                f"layer {layer!r}: none of its allowed candidates {wanted} is usable "
                f"(fits the shape and was measured); usable ones are {fit}"
            )
    ok &= policy
    units = _units(table.layers, tied)
    for u in units:
        if len(u) > 1 and not ok[list(u)].all(0).any():
            members = [table.layers[i] for i in u]
            raise ValueError(f"tied layers {members} have no candidate allowed for all of them")
    return AllocationProblem(
        layers=table.layers,
        candidates=tuple(candidates),
        loss=loss,
        nbytes=nbytes,
        cost=cost,
        unit="seconds" if seconds is not None and unit == "seconds" else "bytes",
        allowed=ok,
        units=units,
        shapes=table.shapes,
        seconds=seconds,
    )


def _policy_mask(
    layers: Sequence[str], names: Sequence[str], allowed: Mapping[str, Collection[str]]
) -> np.ndarray:
    mask = np.ones((len(layers), len(names)), dtype=bool)
    for layer, subset in allowed.items():
        if layer not in layers:
            raise ValueError(f"allowed-candidates constraint names unknown layer {layer!r}")
        unknown = sorted(set(subset) - set(names))
        if unknown:
            raise ValueError(f"layer {layer!r}: allowed candidates {unknown} are not candidates")
        mask[layers.index(layer)] = [n in subset for n in names]
    return mask


def _units(layers: Sequence[str], tied: Sequence[Sequence[str]]) -> tuple[tuple[int, ...], ...]:
    """Union-find the tied groups into a partition of layer indices (model order)."""
    parent = list(range(len(layers)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for group in tied:
        unknown = [g for g in group if g not in layers]
        if unknown:
            raise ValueError(f"tied group {list(group)} names unknown layers {unknown}")
        idx = [layers.index(g) for g in group]
        for i in idx[1:]:
            parent[root(i)] = root(idx[0])
    groups: dict[int, list[int]] = {}
    for i in range(len(layers)):
        groups.setdefault(root(i), []).append(i)
    return tuple(tuple(g) for g in groups.values())


def at_least_bits(candidates: Sequence[Candidate], bits: int) -> frozenset[str]:
    """Names of candidates whose weight elements have at least ``bits`` bits
    (dense candidates count ``dense_bits``), e.g. for "first and last layers >= 8 bits"."""
    return frozenset(c.name for c in candidates if c.element_bits >= bits)


def allowed_by_pattern(
    layers: Sequence[str], rules: Mapping[str, Collection[str]]
) -> dict[str, frozenset[str]]:
    """Expand ``{regex: candidate names}`` into an ``allowed`` mapping for
    :func:`build_problem`. A layer matched (``re.fullmatch``) by several rules gets the
    intersection; a rule that matches no layer raises (it is probably a typo)."""
    out: dict[str, frozenset[str]] = {}
    for pattern, subset in rules.items():
        rx = re.compile(pattern)
        hits = [name for name in layers if rx.fullmatch(name)]
        if not hits:
            raise ValueError(f"allowed-candidates pattern {pattern!r} matches no layer")
        for name in hits:
            out[name] = out.get(name, frozenset(subset)) & frozenset(subset)
    return out
