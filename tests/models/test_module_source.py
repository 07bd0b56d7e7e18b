"""Naming a model built by code: built-in names, factories, and their refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cnn_factory import write_factory

from ptq.errors import PtqInputError, PtqUsageError
from ptq.models.image_inputs import ImageInputs
from ptq.models.module_source import (
    BUILTIN_MODULES,
    ModuleSource,
    resolve_module_source,
    weights_digest,
)


def test_builtin_name_has_its_own_inputs() -> None:
    source = resolve_module_source("efficientnet-lite0", trust_remote_code=False)
    assert source is not None and source.builtin
    assert source.inputs == BUILTIN_MODULES["efficientnet-lite0"].inputs
    assert (source.inputs.size, source.inputs.mean, source.inputs.std) == (
        224,
        (127.0,) * 3,
        (128.0,) * 3,
    )
    with pytest.raises(PtqUsageError, match="fixed inputs"):
        resolve_module_source("efficientnet-lite0", trust_remote_code=False, inputs=ImageInputs())


def test_language_model_names_are_not_modules(tmp_path: Path) -> None:
    for spec in ("default", str(tmp_path), "some/folder", "C:thing-with-dash"):
        assert resolve_module_source(spec, trust_remote_code=True) is None


def test_file_factory_builds_the_same_weights_each_call(tmp_path: Path) -> None:
    path = write_factory(tmp_path / "f")
    source = resolve_module_source(f"{path}:build", trust_remote_code=True)
    assert source is not None and not source.builtin
    assert source.spec == f"{path.resolve()}:build"
    a, b = source.build(trust_remote_code=True), source.build(trust_remote_code=True)
    assert not a.training and weights_digest(a) == weights_digest(b)
    other = write_factory(tmp_path / "g", seed=1)
    c = ModuleSource(f"{other}:build").build(trust_remote_code=True)
    assert weights_digest(c) != weights_digest(a)
    assert ModuleSource.from_dict(source.to_dict()) == source


def test_module_factory_by_dotted_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_factory(tmp_path / "pkg_cnn")
    (tmp_path / "pkg_cnn" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    source = resolve_module_source("pkg_cnn.net:build", trust_remote_code=True)
    assert source is not None and source.spec == "pkg_cnn.net:build"
    assert isinstance(source.build(trust_remote_code=True), torch.nn.Module)


def test_factory_refusals(tmp_path: Path) -> None:
    path = write_factory(tmp_path)
    with pytest.raises(PtqUsageError, match="--trust-remote-code"):
        resolve_module_source(f"{path}:build", trust_remote_code=False)
    with pytest.raises(PtqUsageError, match="--trust-remote-code"):
        ModuleSource(f"{path}:build").build(trust_remote_code=False)
    with pytest.raises(PtqInputError, match="factory file .*missing.py not found"):
        resolve_module_source(f"{tmp_path}/missing.py:build", trust_remote_code=True)
    with pytest.raises(PtqUsageError, match="name the factory function"):
        resolve_module_source(f"{tmp_path}/missing.py", trust_remote_code=True)
    with pytest.raises(PtqInputError, match="factory 'nope' not found"):
        ModuleSource(f"{path}:nope").build(trust_remote_code=True)
    with pytest.raises(PtqInputError, match="returned int, not a torch nn.Module"):
        ModuleSource(f"{path}:not_a_module").build(trust_remote_code=True)
    with pytest.raises(PtqInputError, match="module not found"):
        ModuleSource("no_such_package_xyz.mod:build").build(trust_remote_code=True)
    broken = tmp_path / "broken.py"
    broken.write_text("def build():\n    raise RuntimeError('no weights here')\n")
    with pytest.raises(PtqInputError, match="the factory failed: RuntimeError: no weights here"):
        ModuleSource(f"{broken}:build").build(trust_remote_code=True)
