"""Compile-only checks of the CUDA sources with nvcc for sm_80 and sm_90 (no GPU needed).

The fast test compiles a small probe (one GEMV and one mma GEMM instantiation) for both
architectures in one nvcc call; the slow ones compile every kernel translation unit for
both, and check the pybind binding with the host compiler.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_ext

from ptq.exporters.cuda.build import (
    BINDING_SOURCE,
    CSRC_DIR,
    SUPPORTED_ARCHS,
    find_nvcc,
    kernel_source_paths,
    nvcc_compile_command,
)

PROBE = Path(__file__).resolve().parent / "compile_probe.cu"


def _nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit on PATH or CUDA_HOME): cannot compile")
    return nvcc


def _compile(source: Path, archs: tuple[str, ...], out_dir: Path) -> None:
    obj = out_dir / f"{source.stem}_{'_'.join(archs)}.o"
    cmd = nvcc_compile_command(source, archs, obj, nvcc=_nvcc())
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    assert obj.stat().st_size > 0


def test_probe_compiles_for_sm80_and_sm90(tmp_path: Path) -> None:
    _compile(PROBE, SUPPORTED_ARCHS, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
@pytest.mark.parametrize("source", kernel_source_paths(), ids=lambda p: p.name)
def test_kernel_source_compiles(source: Path, arch: str, tmp_path: Path) -> None:
    _compile(source, (arch,), tmp_path)


@pytest.mark.slow
def test_binding_compiles(tmp_path: Path) -> None:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or find_nvcc() is None:
        pytest.skip("needs g++ and the CUDA toolkit headers")
    homes = [
        cpp_ext.CUDA_HOME,
        str(Path(find_nvcc() or "").resolve().parent.parent),
        "/usr/local/cuda",
    ]
    found = [
        Path(h) / "include" for h in homes if h and (Path(h) / "include/cuda_runtime.h").exists()
    ]
    if not found:
        pytest.skip("CUDA toolkit headers (cuda_runtime.h) not found next to nvcc or CUDA_HOME")
    cuda_include = found[0]
    includes = [
        *cpp_ext.include_paths(),
        str(CSRC_DIR),
        str(cuda_include),
        sysconfig.get_paths()["include"],
    ]
    cmd = [
        cxx,
        "-std=c++17",
        "-fsyntax-only",
        "-DTORCH_EXTENSION_NAME=ptq_probe",
        *(f"-I{p}" for p in includes),
        str(CSRC_DIR / BINDING_SOURCE),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
