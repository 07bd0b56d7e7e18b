"""``ptq allocate`` and the ``--budget`` hooks for ``ptq quantize``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner

from ptq.errors import PtqUsageError
from ptq.passes.allocation.cli import (
    allocate,
    allocation_pass_from_cli,
    budget_options,
    parse_sweep,
)
from ptq.passes.bit_allocation import BitAllocationPass


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_parse_sweep() -> None:
    assert parse_sweep("3.5:4.5:0.5") == [3.5, 4.0, 4.5]
    assert parse_sweep("4,6") == [4.0, 6.0]
    for bad in ("3:2:1", "a:b:c", "4:5:0", "4,-1"):
        with pytest.raises(ValueError, match="sweep"):
            parse_sweep(bad)


def test_allocation_pass_from_cli(tmp_path: Path) -> None:
    assert allocation_pass_from_cli(None, None, "int4_g32,fp16", "fisher") is None
    p = allocation_pass_from_cli("4.5bits", None, "int4_g32,fp16", "hessian", cache_dir=tmp_path)
    assert isinstance(p, BitAllocationPass) and p.config.budget == "4.5bits"
    assert p.config.estimator == "hessian" and p.config.cache_dir == tmp_path
    lat = allocation_pass_from_cli(None, "2ms", "int4_g32,fp16", "fisher")
    assert isinstance(lat, BitAllocationPass) and lat.config.budget == "2ms"
    assert lat.config.latency_budget is None
    both = allocation_pass_from_cli(
        "4bits", "2ms", "int4_g32,fp16", "fisher", kernel_efficiency="h200-ptq-fp16"
    )
    assert isinstance(both, BitAllocationPass)
    assert (both.config.budget, both.config.latency_budget) == ("4bits", "2ms")
    assert both.config.kernel_efficiency == "h200-ptq-fp16"
    with pytest.raises(PtqUsageError, match="needs --budget-latency"):
        allocation_pass_from_cli("4bits", None, "fp16", "fisher", kernel_efficiency="roofline")
    with pytest.raises(PtqUsageError, match="not a preset"):
        allocation_pass_from_cli("4bits", "2ms", "fp16", "fisher", kernel_efficiency="h100")
    for args, match in (
        (("2ms", None, "fp16", "fisher"), "budget-latency"),
        ((None, "70MB", "fp16", "fisher"), "time"),
        (("4bits", None, "int9_g32", "fisher"), "int9_g32"),
        (("4bits", None, "fp16", "magic"), "estimator"),
    ):
        with pytest.raises(PtqUsageError, match=match):
            allocation_pass_from_cli(*args)


def test_budget_options_parse() -> None:
    seen: dict[str, Any] = {}

    @click.command()
    @budget_options
    def cmd(**kw: Any) -> None:
        seen.update(kw)

    res = CliRunner().invoke(cmd, ["--budget", "70MB", "--candidates", "int4_g32,fp16"])
    assert res.exit_code == 0, res.output
    assert seen == {
        "budget": "70MB",
        "budget_latency": None,
        "kernel_efficiency": None,
        "candidates": "int4_g32,fp16",
        "estimator": "fisher",
    }


def test_allocate_writes_report_and_reuses_cache(
    tiny_llama: Path, text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "alloc"
    args = [
        str(tiny_llama), "-o", str(out), "--candidates", "int8_channel,int4_g32,int3_g32,fp16",
        "--estimator", "hessian", "--sweep", "3.5:7.5:2", "--calib", str(text_file),
        "--calib-samples", "2", "--calib-seqlen", "32", "-q",
    ]  # fmt: skip
    res = CliRunner().invoke(
        allocate,
        [*args, "--eval", "--eval-text", str(text_file), "--eval-tokens", "64", "--seqlen", "32"],
    )
    assert res.exit_code == 0, res.output
    assert "saved to" in res.output
    report = (out / "report.md").read_text()
    assert "(pareto.png)" in report and "(layers.png)" in report and "perplexity" in report
    for png in ("pareto.png", "layers.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "allocations.json").read_text())
    bits = [a["bits_per_weight"] for a in summary["frontier"]]
    assert len(bits) == 3
    assert all(b <= budget for b, budget in zip(bits, [3.5, 5.5, 7.5], strict=True))
    assert bits == sorted(bits) and bits[0] < bits[-1]
    assert all(a["perplexity"] > 1 for a in summary["frontier"] + summary["uniform"])
    assert {a["choice"][next(iter(a["choice"]))] for a in summary["uniform"]} == {
        "int8_channel", "int4_g32", "int3_g32", "fp16",
    }  # fmt: skip
    assert len(list(out.glob("sensitivity-hessian-*.json"))) == 1
    again = CliRunner().invoke(allocate, [*args, "--budget", "5bits"])
    assert again.exit_code == 0, again.output
    assert "loaded from" in again.output
    chosen = json.loads((out / "allocations.json").read_text())["chosen"]
    assert chosen["bits_per_weight"] <= 5.0 and chosen["seconds"] is None
    timed = [*args, "--budget", "5bits", "--kernel-efficiency", "h200-ptq-fp16"]
    loose = CliRunner().invoke(allocate, [*timed, "--budget-latency", "1s"])
    assert loose.exit_code == 0, loose.output
    free = json.loads((out / "allocations.json").read_text())["chosen"]
    assert free["choice"] == chosen["choice"]  # a cap that never binds changes nothing
    cap = 0.8 * free["seconds"]
    tight = CliRunner().invoke(allocate, [*timed, "--budget-latency", f"{cap}s"])
    assert tight.exit_code == 0, tight.output
    summary = json.loads((out / "allocations.json").read_text())
    assert summary["chosen"]["seconds"] <= cap and summary["chosen"]["bits_per_weight"] <= 5.0
    assert all(a["seconds"] <= cap for a in summary["frontier"])
    assert summary["chosen"]["objective"] >= free["objective"]
    first = (out / "report.md").read_text().split("\n\n")[1]
    assert " B and " in first and " ms" in first and "modelled latency" in first


def test_allocate_usage_errors(tiny_llama: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(allocate, [str(tiny_llama), "-o", str(tmp_path), "--sweep", "9:1:1"])
    assert res.exit_code == 2 and "error:" in res.output and "sweep" in res.output
    res = CliRunner().invoke(
        allocate, [str(tiny_llama), "-o", str(tmp_path), "--candidates", "int4_g32,nope"]
    )
    assert res.exit_code == 2 and "nope" in res.output
