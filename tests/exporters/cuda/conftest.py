"""Fixtures: the host test harness (the kernels' decode header built by g++, via ctypes)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from ptq.exporters.cuda.build import CSRC_DIR

HARNESS_SOURCE = Path(__file__).resolve().parent / "host_harness.cpp"


def build_harness(out_dir: Path) -> ctypes.CDLL | None:
    """Compile ``host_harness.cpp`` into ``out_dir``; None when no C++ compiler exists."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    lib = out_dir / "ptq_host_harness.so"
    cmd = [
        cxx,
        "-std=c++17",
        "-O1",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-unknown-pragmas",
        f"-I{CSRC_DIR}",
        str(HARNESS_SOURCE),
        "-o",
        str(lib),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    dll = ctypes.CDLL(str(lib))
    for name in ("h_half_bits_to_float", "h_bf16_bits_to_float"):
        getattr(dll, name).argtypes = [ctypes.c_uint16]
        getattr(dll, name).restype = ctypes.c_float
    unary = ("h_e2m1_to_float", "h_e4m3_to_float", "h_e8m0_to_float")
    for name in (*unary, "h_fp6_e2m3_to_float", "h_fp6_e3m2_to_float"):
        getattr(dll, name).argtypes = [ctypes.c_uint32]
        getattr(dll, name).restype = ctypes.c_float
    dll.h_int4_value.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.c_float]
    dll.h_int4_value.restype = ctypes.c_float
    p = ctypes.c_void_p
    dll.h_bits_code.argtypes = [p, ctypes.c_int, ctypes.c_int]
    dll.h_bits_code.restype = ctypes.c_uint32
    dll.h_dequantize.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        p,
        p,
        p,
        p,
        p,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        p,
    ]
    dll.h_dequantize.restype = ctypes.c_int
    return dll


@pytest.fixture(scope="session")
def harness(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """The compiled host harness; skips (naming the reason) only when no g++/c++ exists."""
    dll = build_harness(tmp_path_factory.mktemp("ptq_host_harness"))
    if dll is None:
        pytest.skip("no C++ compiler (g++/c++) on PATH to build the host decode harness")
    return dll
