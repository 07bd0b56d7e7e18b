"""A diffusers UNet through ``ptq quantize`` on the command line (trajectory calibration),
written with ptq's writer, reloaded, verified and evaluated per timestep."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import ptq
from ptq.cli import build_scheme
from ptq.compose import build_passes
from ptq.errors import PtqUsageError
from ptq.models.diffusion import DiffusionInputs, denoise
from ptq.models.module_loader import load_quantized_module
from ptq.models.module_source import resolve_module_source

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("single_thread")

FACTORY = """
from ptq.models.diffusion import random_unet


def build():
    return random_unet(sample_size=8, channels=(32, 32))
"""
SAMPLING = ("--diffusion-steps", "4", "--diffusion-trajectories", "3", "-q")


@pytest.fixture()
def factory(tmp_path: Path) -> str:
    path = tmp_path / "unet.py"
    path.write_text(FACTORY)
    return f"{path}:build"


def test_quantize_reload_reproduces_the_in_memory_model(
    tmp_path: Path, factory: str, run_cli: Any
) -> None:
    out = tmp_path / "out"
    r = run_cli(
        "quantize", factory, "--weight-format", "nvfp4", "--method", "gptq", "--ignore",
        "conv_in", "-o", str(out), "--trust-remote-code", *SAMPLING,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    record = json.loads((out / "config.json").read_text())["ptq_module"]
    assert record["inputs"] == {
        "kind": "diffusion", "steps": 4, "scheduler": "ddim", "text_tokens": 8, "trajectories": 3,
    }  # fmt: skip
    assert record["calibration_seed"] == 0
    r = run_cli("verify", str(out))
    assert r.exit_code == 0 and r.output.startswith(f"ok: {out}: "), r.output

    loaded = load_quantized_module(out, trust_remote_code=True)
    source = resolve_module_source(factory, trust_remote_code=True)
    assert source is not None
    model = source.build(trust_remote_code=True)
    inputs = DiffusionInputs(steps=4, trajectories=3)
    scheme = build_scheme((), None, "nvfp4", None, None, ("conv_in",))
    mem = ptq.quantize(
        model, scheme, calibration=inputs.batches(model, seed=0),
        pipeline=build_passes(scheme, method="gptq"), progress=False, log=lambda *_: None,
    ).model  # fmt: skip
    assert mem is not None
    held_out = inputs.record(source.build(trust_remote_code=True), n=2, seed=5)
    with torch.no_grad():
        for s in range(held_out.steps):
            step = held_out.step_inputs(s)
            assert torch.equal(denoise(loaded.model, step), denoise(mem, step))

    r = run_cli("eval", str(out), "--samples", "2", "--trust-remote-code")
    assert r.exit_code == 0, r.output
    assert "2 held-out trajectories x 4 steps (seed 1)" in r.output
    sqnr = [float(v) for v in re.findall(r"SQNR ([\d.]+) dB", r.output)]
    assert len(sqnr) == 4 and all(5.0 < v < 60.0 for v in sqnr)


def test_refusals(tmp_path: Path, factory: str, run_cli: Any) -> None:
    out = tmp_path / "out"
    base = ("quantize", factory, "--weight-format", "nvfp4", "-o", str(out), "--trust-remote-code")
    r = run_cli(*base, *SAMPLING)
    assert r.exit_code == 2 and "conv_in: no power-of-two group size" in r.output
    r = run_cli(*base, "--calib", str(tmp_path), *SAMPLING)
    assert r.exit_code == 2 and "drop --calib" in r.output
    r = run_cli(*base, "--image-size", "8", *SAMPLING)
    assert r.exit_code == 2 and "choose one" in r.output
    r = run_cli("quantize", "default", "--w4a16", "-o", str(out), *SAMPLING)
    assert r.exit_code == 2 and "--diffusion-* options describe a model built by code" in r.output
    assert not out.exists()
    with pytest.raises(PtqUsageError, match="drop the --image-"):
        from ptq.models.image_inputs import ImageInputs

        resolve_module_source("unet-small", trust_remote_code=False, inputs=ImageInputs())


def test_builtin_unet_takes_sampling_settings() -> None:
    default = resolve_module_source("unet-small", trust_remote_code=False)
    assert default is not None and default.inputs == DiffusionInputs()
    mine = DiffusionInputs(steps=3, scheduler="ddpm")
    source = resolve_module_source("unet-small", trust_remote_code=False, inputs=mine)
    assert source is not None and source.inputs == mine
