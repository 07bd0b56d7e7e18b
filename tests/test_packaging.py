"""The wheel installs only ``ptq`` (top-level folders mapped into its namespace)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        cwd=out,
    )
    return next(out.glob("ptq-*.whl"))


def test_wheel_contains_only_the_ptq_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"ptq"}
    for required in (
        "ptq/py.typed",
        "ptq/passes/rtn.py",
        "ptq/calibration/text.py",
        "ptq/exporters/safetensors_export.py",
        "ptq/formats/quantizer.py",
        "ptq/cli.py",
    ):
        assert required in names, required
    assert not any(n.startswith(("tests/", "passes/", "calibration/", "exporters/")) for n in names)


def test_import_from_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = "import ptq.passes.rtn, ptq.calibration.text, ptq.exporters.ct_config, ptq; print(ptq.passes.rtn.__file__)"
    res = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert res.stdout.strip().startswith(str(target))
