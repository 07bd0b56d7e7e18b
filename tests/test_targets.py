"""`--target` and the closing "runs on" line of `ptq quantize` (no vLLM needed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ptq.errors import PtqUsageError
from ptq.passes.bit_allocation import DEFAULT_CANDIDATES
from ptq.scheme import get_scheme
from ptq.targets import check_target, target_candidates

Run = Callable[..., Any]
FAST = ["-q", "--calib-samples", "2", "--calib-seqlen", "32"]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--w4a16", "--lorc", "4"], "LoRC"),
        (["--w4a16", "--kv-cache", "int8"], "FP8 KV-cache scales only"),
        (["--w4a16", "--kv-cache", "fp8_e4m3", "--target", "onnx"], "KV-cache"),
    ],
)
def test_unserved_passes_are_refused_before_writing(
    run_cli: Run, tiny_llama: Path, tmp_path: Path, flags: list[str], needle: str
) -> None:
    out = tmp_path / "o"
    r = run_cli("quantize", str(tiny_llama), *flags, "-o", str(out), *FAST)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: --target") and needle in r.output, r.output
    assert not out.exists()


def test_online_hadamard_is_refused_for_vllm_and_onnx() -> None:
    from ptq.passes.rotation import RotationConfig, RotationPass

    passes = [RotationPass(RotationConfig(online_down_proj=True))]
    for target in ("vllm", "onnx"):
        with pytest.raises(PtqUsageError, match="online down_proj Hadamard"):
            check_target(target, passes)
    check_target("ptq", passes)
    check_target("vllm", [RotationPass(RotationConfig())])  # offline rotation is served


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--w4a16"], "runs on: vLLM (CPU and CUDA), ONNX Runtime"),
        (["--w8a8"], "runs on: vLLM (CPU and CUDA), ONNX Runtime"),
        (["--w4a8"], "vLLM (CUDA only: INT4 x FP8 (W4A8) needs Hopper"),
        (["--weight-format", "nvfp4"], "vLLM (CUDA only: the CPU build has no FP4 kernel)"),
        (["--weight-format", "int3_g64"], "not vLLM: int3_g64 has no compressed-tensors layout"),
        (["--weight-format", "mxfp6_e3m2"], "ptq's CUDA kernels, ptq (`ptq eval`, emulated)"),
        (["--w4a16", "--lorc", "4", "--target", "onnx"], "not vLLM: LoRC factors"),
    ],
)
def test_quantize_ends_naming_the_runtimes(
    run_cli: Run, tiny_llama: Path, tmp_path: Path, flags: list[str], line: str
) -> None:
    r = run_cli("quantize", str(tiny_llama), *flags, "-o", str(tmp_path / "o"), *FAST)
    assert r.exit_code == 0, r.output
    runs_on = next(ln for ln in r.output.splitlines() if ln.startswith("runs on:"))
    assert line in runs_on, runs_on
    assert "ptq (`ptq eval`, emulated)" in runs_on


def test_budget_candidates_follow_the_target() -> None:
    scheme = get_scheme("w4a16")
    vllm = target_candidates("vllm", DEFAULT_CANDIDATES, scheme, explicit=False).split(",")
    assert "int3_g64" not in vllm and {"int4_g128", "nvfp4", "fp16"} <= set(vllm)
    assert "int3_g64" in target_candidates("ptq", DEFAULT_CANDIDATES, scheme, explicit=False)
    onnx = target_candidates("onnx", DEFAULT_CANDIDATES, scheme, explicit=False).split(",")
    assert "nvfp4" not in onnx and "int3_g64" in onnx
    with pytest.raises(PtqUsageError, match="int3_g64"):
        target_candidates("vllm", "int4_g64,int3_g64,fp16", scheme, explicit=True)
    with pytest.raises(PtqUsageError, match=r"int4_g64\+lorc8"):
        target_candidates("vllm", "int4_g64,int4_g64+lorc8,fp16", scheme, explicit=True)
