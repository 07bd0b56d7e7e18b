"""``ptq quantize`` / ``verify`` / ``eval`` on models built by code, from the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cnn_factory import write_factory, write_images

SMALL = ("--image-size", "24", "--calib-samples", "4", "-q")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_factory_quantize_verify_eval(tmp_path: Path, run_cli: Any) -> None:
    factory = write_factory(tmp_path / "f")
    cal, held_out = write_images(tmp_path / "cal"), write_images(tmp_path / "eval", seed=9)
    out = tmp_path / "out"
    r = run_cli(
        "quantize", f"{factory}:build", "--w8a8", "--method", "gptq", "--calib", str(cal),
        "-o", str(out), "--trust-remote-code", *SMALL,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "5 layers quantized (w8a8), 2 batch-norms folded" in r.output
    assert "ptq verify" in r.output
    assert _leftovers(tmp_path) == []
    record = json.loads((out / "config.json").read_text())["ptq_module"]
    assert record["model"] == f"{factory.resolve()}:build"
    assert record["inputs"]["size"] == 24
    r = run_cli("verify", str(out))
    assert r.exit_code == 0 and r.output.startswith(f"ok: {out}: ")
    assert "5 quantized layers dequantize" in r.output
    r = run_cli(
        "eval", str(out), "--images", str(held_out), "--samples", "6", "--trust-remote-code"
    )
    assert r.exit_code == 0, r.output
    agree = re.search(
        r"top-1 agreement with FP: ([\d.]+) \(6 crops of 4 held-out images, 24x24\)", r.output
    )
    err = re.search(r"relative output error \|\|y_q - y_fp\|\| / \|\|y_fp\|\|: ([\d.]+)", r.output)
    assert agree is not None and err is not None
    assert 0.0 <= float(agree.group(1)) <= 1.0 and 0.0 < float(err.group(1)) < 0.5


def test_eval_refusals(tmp_path: Path, run_cli: Any, tiny_llama: Path) -> None:
    factory = write_factory(tmp_path / "f")
    cal = write_images(tmp_path / "cal")
    out = tmp_path / "out"
    args = ("quantize", f"{factory}:build", "--w8a16", "--calib", str(cal), "-o", str(out))
    assert run_cli(*args, "--trust-remote-code", *SMALL).exit_code == 0
    r = run_cli("eval", str(out), "--images", str(cal), "--trust-remote-code")
    assert r.exit_code == 2 and "img0.png is a calibration image of" in r.output
    r = run_cli("eval", str(out))
    assert r.exit_code == 2 and "--trust-remote-code" in r.output
    r = run_cli("eval", str(out), "--seqlen", "64", "--trust-remote-code")
    assert r.exit_code == 2 and "--seqlen apply to language models" in r.output
    r = run_cli("eval", str(tiny_llama), "--images", str(cal))
    assert r.exit_code == 2 and "evaluate the output of an image model" in r.output
    write_factory(tmp_path / "f", seed=5)  # the factory now builds other weights
    r = run_cli("eval", str(out), "--trust-remote-code")
    assert r.exit_code == 2 and "now builds other weights" in r.output


def test_bad_input_is_one_error_line_and_nothing_written(tmp_path: Path, run_cli: Any) -> None:
    factory = write_factory(tmp_path / "f")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    cases = [
        ((f"{factory}:build",), "runs your code to build the model; pass --trust-remote-code"),
        (("efficientnet-lite9",), "model path efficientnet-lite9 does not exist"),
        ((f"{tmp_path}/none.py:build", "--trust-remote-code"), "factory file"),
        ((f"{factory}:missing", "--trust-remote-code"), "factory 'missing' not found"),
        ((f"{factory}:build", "--trust-remote-code", "--calib", str(tmp_path / "empty")),
         "holds no images"),
        ((f"{factory}:build", "--trust-remote-code", "--eval", "--rotate"),
         "these options are for language models: --eval (evaluate the output with `ptq eval "
         "OUT`), --rotate"),
        ((f"{factory}:build", "--trust-remote-code", "--target", "vllm"), "--target vllm"),
        ((f"{factory}:build", "--trust-remote-code", "--image-mean", "1,2"),
         "--image-mean takes one number or three"),
        (("efficientnet-lite0", "--image-size", "32"), "efficientnet-lite0 has fixed inputs"),
        (("default", "--image-size", "32"), "default is a language model"),
    ]  # fmt: skip
    for args, message in cases:
        r = run_cli("quantize", *args, "--w8a16", "-o", str(out), "-q")
        assert r.exit_code == 2, (args, r.output)
        lines = r.output.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], (args, r.output)
        assert not out.exists() and _leftovers(tmp_path) == []


def test_grouped_format_on_convs_names_the_layers(tmp_path: Path, run_cli: Any) -> None:
    """INT4 g128 (--w4a16) cannot group a 3x3 conv's 27 inputs: named, with the fix."""
    factory = write_factory(tmp_path / "f")
    cal = write_images(tmp_path / "cal")
    r = run_cli(
        "quantize", f"{factory}:build", "--w4a16", "--calib", str(cal), "-o",
        str(tmp_path / "out"), "--trust-remote-code", *SMALL,
    )  # fmt: skip
    assert r.exit_code == 2
    assert "stem: no power-of-two group size >= 16 divides its input size 27" in r.output
    r = run_cli(
        "quantize", f"{factory}:build", "--weight-format", "int4_channel", "--calib", str(cal),
        "-o", str(tmp_path / "out"), "--trust-remote-code", *SMALL,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "out" / "ptq_plan.json").read_text())
    assert {lp["method"] for lp in plan["layers"].values()} == {"gptq"}  # 4-bit default


@pytest.mark.slow
def test_efficientnet_lite0_from_the_command_line(tmp_path: Path, run_cli: Any) -> None:
    """The real model: BN folded, every conv and the head written, verified, evaluated on
    held-out photos, and reloaded to exactly the in-memory result."""
    import torch

    import ptq
    from ptq.compose import build_passes
    from ptq.models.image_inputs import default_calibration_images
    from ptq.models.module_source import resolve_module_source
    from ptq.models.quantized_loader import load_quantized_model
    from ptq.scheme import get_scheme

    pytest.importorskip("efficientnet_lite_pytorch")
    out = tmp_path / "lite0"
    r = run_cli(
        "quantize", "efficientnet-lite0", "--w8a8", "--method", "rtn", "--calib-samples", "8",
        "-o", str(out), "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "50 layers quantized (w8a8), 49 batch-norms folded" in r.output
    r = run_cli("verify", str(out))
    assert r.exit_code == 0 and "50 quantized layers dequantize" in r.output, r.output
    r = run_cli("eval", str(out), "--samples", "25")
    assert r.exit_code == 0, r.output
    agree = re.search(r"top-1 agreement with FP: ([\d.]+)", r.output)
    assert agree is not None and float(agree.group(1)) >= 0.6, r.output
    source = resolve_module_source("efficientnet-lite0", trust_remote_code=False)
    assert source is not None
    net = source.build(trust_remote_code=False)
    batches = source.inputs.batches(default_calibration_images(), 8, seed=0)
    scheme = get_scheme("w8a8")
    memory = ptq.quantize(
        net, scheme, calibration=batches, pipeline=build_passes(scheme), progress=False
    ).model
    assert memory is not None
    reloaded, _ = load_quantized_model(out)
    x = source.inputs.samples(default_calibration_images()[:4], 4, seed=3)
    with torch.no_grad():
        assert torch.equal(reloaded(inputs=x), memory(inputs=x))
