"""Recipe files: a pipeline and scheme as YAML/JSON, mapped 1:1 to the dataclasses.

Example ``recipe.yaml``::

    version: 1
    scheme: w4a8                 # a preset name, or a full Scheme dict
    calibration: {samples: 64, seqlen: 256}
    passes:
      - gptq: {percdamp: 0.01, act_order: true}

Unknown keys, unknown pass names and wrongly typed values are rejected with a message
naming the key and listing what is allowed.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from ptq.errors import PtqInputError
from ptq.pipeline import Pass, Pipeline
from ptq.scheme import Scheme, get_scheme

RECIPE_VERSION = 1
RECIPE_KEYS = {"version", "scheme", "calibration", "passes"}
CALIBRATION_KEYS = {"samples", "seqlen", "path"}


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe."""

    scheme: Scheme | None
    pipeline: Pipeline
    calibration: dict[str, Any]


def _check_type(value: Any, hint: Any, where: str) -> None:
    origin = typing.get_origin(hint)
    if hint is Any:
        return
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise PtqInputError(f"{where}: {value!r} is not one of {list(typing.get_args(hint))}")
        return
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(hint):
            try:
                _check_type(value, arm, where)
                return
            except PtqInputError as exc:
                errors.append(str(exc))
        raise PtqInputError(f"{where}: {value!r} has the wrong type (expected {hint})")
    if hint is type(None):
        if value is not None:
            raise PtqInputError(f"{where}: expected null, got {value!r}")
        return
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(hint, type):
        ok = isinstance(value, hint)
    else:
        ok = True  # complex hints (tuples of dataclasses) are validated by the class itself
    if not ok:
        raise PtqInputError(
            f"{where}: {value!r} has the wrong type (expected {getattr(hint, '__name__', hint)})"
        )


def build_config(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate a frozen config dataclass from ``data`` with strict key/type checks."""
    if not isinstance(data, dict):
        raise PtqInputError(f"{where}: expected a mapping of options, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PtqInputError(f"{where}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    data = dict(data)
    for f in fields(cls):
        if f.name in data:
            if isinstance(data[f.name], list) and typing.get_origin(hints[f.name]) is tuple:
                data[f.name] = tuple(data[f.name])
            _check_type(data[f.name], hints[f.name], f"{where}.{f.name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise PtqInputError(f"{where}: missing required option {f.name!r}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise PtqInputError(f"{where}: {exc}") from None


def parse_pass(entry: Any, index: int, previous: list[Pass] | None = None) -> Pass:
    """One ``passes`` entry: ``{name: {options}}`` or a bare ``name``.

    Wrapper passes (``lorc``, ``bias_correction``) wrap the pass listed just before them.
    """
    from ptq.passes.registry import pass_table, wrapper_table

    table = pass_table()
    wrappers = wrapper_table()
    if isinstance(entry, str):
        name, options = entry, dict[str, Any]()
    elif isinstance(entry, dict) and len(entry) == 1:
        name, options = next(iter(entry.items()))
        options = options or {}
    else:
        raise PtqInputError(
            f"passes[{index}]: expected 'name' or {{name: {{options}}}}, got {entry!r}"
        )
    if name in wrappers:
        if not previous:
            raise PtqInputError(
                f"passes[{index}]: {name!r} wraps the pass before it; list a weight pass first"
            )
        wcls, wcfg = wrappers[name]
        return wcls(previous.pop(), build_config(wcfg, options, f"passes[{index}].{name}"))
    if name not in table:
        valid = ", ".join(sorted([*table, *wrappers]))
        raise PtqInputError(f"passes[{index}]: unknown pass {name!r}; valid: {valid}")
    cls, cfg_cls = table[name]
    return cls(build_config(cfg_cls, options, f"passes[{index}].{name}"))


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate and build a :class:`Recipe` from parsed YAML/JSON."""
    if not isinstance(data, dict):
        raise PtqInputError(f"{source}: the top level must be a mapping")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise PtqInputError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(RECIPE_KEYS)}")
    if data.get("version", RECIPE_VERSION) != RECIPE_VERSION:
        raise PtqInputError(
            f"{source}: version {data['version']!r} is not supported (use {RECIPE_VERSION})"
        )
    scheme = None
    raw = data.get("scheme")
    try:
        if isinstance(raw, str):
            scheme = get_scheme(raw)
        elif isinstance(raw, dict):
            scheme = Scheme.from_dict(raw)
        elif raw is not None:
            raise PtqInputError(f"{source}: scheme must be a preset name or a mapping")
    except (ValueError, TypeError, KeyError) as exc:
        raise PtqInputError(f"{source}: scheme: {exc}") from None
    passes_raw = data.get("passes", [])
    if not isinstance(passes_raw, list) or not passes_raw:
        raise PtqInputError(f"{source}: 'passes' must be a non-empty list")
    calibration = data.get("calibration", {}) or {}
    if not isinstance(calibration, dict):
        raise PtqInputError(f"{source}: calibration must be a mapping")
    bad = sorted(set(calibration) - CALIBRATION_KEYS)
    if bad:
        raise PtqInputError(
            f"{source}: unknown calibration key(s) {bad}; allowed: {sorted(CALIBRATION_KEYS)}"
        )
    for key in ("samples", "seqlen"):
        if key in calibration:
            _check_type(calibration[key], int, f"{source}: calibration.{key}")
    passes: list[Pass] = []
    for i, entry in enumerate(passes_raw):
        passes.append(parse_pass(entry, i, passes))
    return Recipe(scheme=scheme, pipeline=Pipeline(passes), calibration=dict(calibration))


def load_recipe(path: Path) -> Recipe:
    """Read a ``.yaml``/``.yml``/``.json`` recipe file."""
    if not path.is_file():
        raise PtqInputError(f"recipe {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # YAML and JSON raise different types
        raise PtqInputError(f"recipe {path} cannot be parsed: {exc}") from None
    return parse_recipe(data, str(path))
