"""The vLLM oracle: one vLLM process per test module (a process that served a dense
model cannot load a mixture-of-experts one: vLLM sets up expert parallelism at start)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ptq.exporters.vllm_oracle import VllmOracle, find_vllm_python

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def oracle() -> Iterator[VllmOracle]:
    python = find_vllm_python([ROOT / ".venv-vllm/bin/python"])
    if python is None:
        pytest.skip("no vLLM environment (make setup builds .venv-vllm on x86-64 Linux)")
    with VllmOracle(python) as o:
        yield o
