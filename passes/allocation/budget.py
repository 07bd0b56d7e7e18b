"""Budgets for bit allocation: bits per weight, a size in bytes, or a modelled latency.

Accepted strings (a number, optional spaces, a unit)::

    "4.5bits", "4.5 bpw"              bits per weight over the quantizable layers' weights
    "70MB", "500KB", "1.5GB", "123"   bytes, decimal prefixes (1 KB = 1000 B; no unit = B)
    "70MiB", "64KiB", "2GiB"          bytes, binary prefixes (1 KiB = 1024 B)
    "2.5ms", "800us", "0.01s"         seconds of modelled latency

A bits-per-weight budget ``b`` over ``P`` weights is the byte budget ``b * P / 8``: scales,
zero points and LoRC factors all count against it (INT4 g128 with fp16 scales costs
4.125 bits/weight).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

BudgetKind = Literal["bits", "bytes", "seconds"]
CostUnit = Literal["bytes", "seconds"]

_BYTE_UNITS: dict[str, int] = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_BIT_UNITS = ("bits", "bit", "bpw")
_TIME_UNITS: dict[str, float] = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_PATTERN = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-zµ]*)\s*")
_VALID = "e.g. '4.5bits', '4.5bpw', '70MB', '70MiB', '500KB', '123456' (bytes), '2.5ms', '800us'"


@dataclass(frozen=True)
class Budget:
    """A parsed budget.

    Args:
        value: Positive amount in ``kind`` units (bits per weight, bytes, or seconds).
        kind: ``bits`` (per weight), ``bytes`` or ``seconds``.
    """

    value: float
    kind: BudgetKind

    def __post_init__(self) -> None:
        if self.kind not in ("bits", "bytes", "seconds"):
            raise ValueError(f"budget kind must be bits, bytes or seconds, got {self.kind!r}")
        if not (math.isfinite(self.value) and self.value > 0):
            raise ValueError(f"budget must be a positive finite amount, got {self.value}")

    def resolve(self, unit: CostUnit, n_weights: int) -> float:
        """The budget in the cost unit of an allocation problem.

        Args:
            unit: ``bytes`` (size model) or ``seconds`` (latency model).
            n_weights: Number of weights in the quantizable layers (for ``bits``).

        Raises:
            ValueError: when the budget's kind cannot be expressed in ``unit``.
        """
        if unit == "bytes" and self.kind == "bits":
            if n_weights < 1:
                raise ValueError("a bits-per-weight budget needs at least one weight")
            return self.value * n_weights / 8
        if (unit == "bytes" and self.kind == "bytes") or unit == "seconds" == self.kind:
            return self.value
        raise ValueError(
            f"a {self.kind} budget ({self}) cannot constrain a cost measured in {unit}; "
            f"use a {'latency' if unit == 'seconds' else 'size or bits-per-weight'} budget"
        )

    def __str__(self) -> str:
        suffix = {"bits": " bits/weight", "bytes": " B", "seconds": " s"}[self.kind]
        return f"{self.value:g}{suffix}"


def parse_budget(text: str) -> Budget:
    """Parse a budget string (see the module docstring for the accepted forms).

    Raises:
        ValueError: malformed text, an unknown unit, or a non-positive amount; the
            message quotes the input and lists valid examples.
    """
    if not isinstance(text, str):
        raise ValueError(f"budget must be a string such as '4.5bits', got {text!r}")
    m = _PATTERN.fullmatch(text)
    if m is None:
        raise ValueError(f"malformed budget {text!r}; {_VALID}")
    number, unit = float(m.group(1)), m.group(2)
    if number <= 0:
        raise ValueError(f"budget {text!r} must be positive; {_VALID}")
    if unit.lower() in _BIT_UNITS:
        return Budget(number, "bits")
    if unit in _BYTE_UNITS:
        return Budget(number * _BYTE_UNITS[unit], "bytes")
    if unit in _TIME_UNITS:
        return Budget(number * _TIME_UNITS[unit], "seconds")
    raise ValueError(f"unknown unit {unit!r} in budget {text!r}; {_VALID}")


def as_budget(budget: Budget | str | float) -> Budget | float:
    """Normalise a user budget: strings are parsed, numbers pass (already in cost units)."""
    if isinstance(budget, str):
        return parse_budget(budget)
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a number, string or Budget, got {budget!r}")
    if isinstance(budget, int | float) and not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive finite amount, got {budget}")
    return budget
