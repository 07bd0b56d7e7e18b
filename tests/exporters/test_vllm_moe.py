"""Quantized mixture-of-experts artifacts under vLLM's CPU build (marker ``vllm``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ptq.exporters.vllm_oracle import VllmError, VllmOracle

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("scheme", ["w4a16", "w8a8", "fp8"])
def test_vllm_cpu_reaches_the_moe_kernels_and_has_none(
    oracle: VllmOracle, tmp_path: Path, tiny_model_factory: Callable[..., Path], scheme: str
) -> None:
    """A Mixtral with every expert quantized (GPTQ, router kept dense): vLLM's CPU build
    reads the config and the per-expert weight names as far as choosing a MoE kernel,
    and has none for any quantized scheme; ptq's closing line says so (CUDA only)."""
    from click.testing import CliRunner
    from tiny_archs import ARCHS

    from ptq.cli import main

    folder = tiny_model_factory(
        tmp_path / "mixtral",
        "mixtral",
        **{**ARCHS["mixtral"], "hidden_size": 128, "intermediate_size": 256},
    )
    oracle.load(folder, max_model_len=128)  # the FP model is served
    out = tmp_path / scheme
    args = ["quantize", str(folder), f"--{scheme}", "--method", "gptq", "-o", str(out)]
    r = CliRunner().invoke(main, [*args, "--calib-samples", "2", "--calib-seqlen", "32"])
    assert r.exit_code == 0, r.output
    assert "vLLM (CUDA only: its CPU build has no quantized mixture-of-experts" in r.output
    with pytest.raises(VllmError, match="MoE backend"):
        oracle.load(out, max_model_len=128)
