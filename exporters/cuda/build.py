"""Build and lazily load the CUDA extension (``torch.utils.cpp_extension.load``).

Nothing is compiled at import: :func:`load_extension` builds the sources in ``csrc/`` with
nvcc for the current device's architecture the first time a CUDA op runs, and torch
caches the build (``TORCH_EXTENSIONS_DIR``). :func:`nvcc_compile_command` gives the
compile-only command the tests use to check every kernel source for sm_80 and sm_90.
"""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
KERNEL_SOURCES = (
    "qlinear_dispatch.cu",
    "qlinear_int4.cu",
    "qlinear_int4_f32.cu",
    "qlinear_int4_asym.cu",
    "qlinear_int4_asym_f32.cu",
    "qlinear_fp4.cu",
    "qlinear_byte8.cu",
    "qlinear_int3.cu",
    "qlinear_int5.cu",
    "qlinear_int6.cu",
    "qlinear_fp6.cu",
)
BINDING_SOURCE = "bind.cpp"
NVCC_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo")
SUPPORTED_ARCHS = ("sm_80", "sm_90")

GEMV_MAX_BATCH = 8
GEMM_TILE_N = 128
GEMM_TILE_K = 32


def kernel_source_paths() -> list[Path]:
    """The CUDA translation units (torch-independent)."""
    return [CSRC_DIR / name for name in KERNEL_SOURCES]


def find_nvcc() -> str | None:
    """Path of ``nvcc`` on ``PATH`` or under ``CUDA_HOME``, or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return None


def nvcc_compile_command(
    source: Path, archs: Sequence[str], output: Path, nvcc: str = "nvcc"
) -> list[str]:
    """The nvcc command compiling one ``.cu`` to an object for ``archs`` (e.g. sm_80, sm_90)."""
    bad = [a for a in archs if a not in SUPPORTED_ARCHS]
    if bad or not archs:
        raise ValueError(f"archs {bad or archs} not supported; valid: {', '.join(SUPPORTED_ARCHS)}")
    gencode = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in archs]
    return [nvcc, *NVCC_FLAGS, *gencode, f"-I{CSRC_DIR}", "-c", str(source), "-o", str(output)]


def gemm_split_k(m: int, n: int, k: int, num_sms: int) -> int:
    """K splits for the GEMM so that about two blocks run per multiprocessor.

    Small batches give few output tiles (``ceil(N/128) * ceil(M/BM)``); splitting K keeps
    every SM streaming weights. Each split keeps at least 8 K-tiles of 32.
    """
    if m <= GEMV_MAX_BATCH:
        return 1
    tile_m = 16 if m <= 32 else 64
    blocks = math.ceil(n / GEMM_TILE_N) * math.ceil(m / tile_m)
    k_tiles = k // GEMM_TILE_K
    want = max(1, (2 * num_sms) // max(blocks, 1))
    return max(1, min(want, k_tiles // 8))


@functools.cache
def load_extension(verbose: bool = False) -> ModuleType:
    """Compile (first call; cached afterwards) and import the kernels for this GPU.

    Raises:
        RuntimeError: No CUDA device, a device older than sm_80, or no nvcc.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("ptq CUDA kernels need a CUDA device; none is available")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise RuntimeError(f"ptq CUDA kernels need sm_80 or newer, this GPU is sm_{major}{minor}")
    if find_nvcc() is None:
        raise RuntimeError("ptq CUDA kernels need nvcc (set CUDA_HOME or put nvcc on PATH)")
    from torch.utils.cpp_extension import load

    sources = [str(p) for p in kernel_source_paths()] + [str(CSRC_DIR / BINDING_SOURCE)]
    return load(
        name=f"ptq_qlinear_sm{major}{minor}",
        sources=sources,
        extra_cflags=["-O2", "-std=c++17"],
        extra_cuda_cflags=[
            *NVCC_FLAGS,
            f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}",
        ],
        extra_include_paths=[str(CSRC_DIR)],
        verbose=verbose,
    )
