"""A model built by code into an output: BN folded, every weight method and format written
by the one writer, verified, and reloaded computing exactly what the in-memory run did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cnn_factory import write_factory, write_images
from torch import nn

import ptq
from ptq.api import CalibrationConfig, QuantizeResult
from ptq.compose import build_passes
from ptq.models.image_inputs import ImageInputs, image_files
from ptq.models.module_source import ModuleSource
from ptq.models.quantized_loader import load_quantized_model
from ptq.scheme import Scheme, get_scheme
from ptq.verify import verify_output

SAMPLES = 6


def _source(tmp_path: Path) -> ModuleSource:
    path = write_factory(tmp_path / "factory")
    return ModuleSource(f"{path.resolve()}:build", ImageInputs(size=24))


def _write(
    source: ModuleSource,
    s: Scheme,
    method: str,
    images: Path,
    out: Path,
    knobs: dict[str, Any] | None = None,
) -> QuantizeResult:
    """``ptq.quantize`` of ``source`` into ``out``: what ``ptq quantize`` runs."""
    return ptq.quantize(
        source,
        s,
        output=out,
        pipeline=build_passes(s, method=method, knobs=knobs),
        calibration=CalibrationConfig(path=images, samples=SAMPLES),
        trust_remote_code=True,
        progress=False,
        log=lambda *_: None,
    )


def _in_memory(source: ModuleSource, scheme: Scheme, method: str, images: Path) -> nn.Module:
    """The same run kept in memory (the API on the built module)."""
    net = source.build(trust_remote_code=True)
    inputs = source.inputs.bound_to(net)
    batches = inputs.batches(image_files(images), SAMPLES, seed=0)
    result = ptq.quantize(
        net,
        scheme,
        calibration=batches,
        pipeline=build_passes(scheme, method=method),
        progress=False,
    )
    assert result.model is not None
    return result.model


@pytest.mark.parametrize(
    ("scheme", "method"),
    [
        ("w8a16", "rtn"),
        ("w8a8", "gptq"),
        ("fp8", "rtn"),
        ("w8a16", "adaround"),
        ("w8a16", "adaquant"),
    ],
)
def test_output_reloads_to_the_in_memory_numerics(tmp_path: Path, scheme: str, method: str) -> None:
    source = _source(tmp_path)
    images = write_images(tmp_path / "images")
    out = tmp_path / "out"
    s = get_scheme(scheme)
    knobs = {"iterations": 5} if "ada" in method else None
    result = _write(source, s, method, images, out, knobs)
    assert result.output == out and result.model is None
    assert verify_output(out).layers == 5
    config = json.loads((out / "config.json").read_text())
    record = config["ptq_module"]
    assert record["folded"] == [["stem", "bn0"], ["dw", "bn1"]]
    assert record["inputs"]["input_name"] == "pixels"
    assert len(record["calibration_sha256"]) == 4
    assert {lp.method for lp in result.plan} == {method}
    reloaded, tokenizer = load_quantized_model(out, trust_remote_code=True)
    assert tokenizer is None
    assert sum(isinstance(m, nn.BatchNorm2d) for m in reloaded.modules()) == 0
    if "ada" in method:  # the API run below repeats GPTQ/RTN; AdaRound/AdaQuant use 5 steps
        return
    memory = _in_memory(source, s, method, images)
    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(x), memory(x))


@pytest.mark.parametrize("fmt", ["int4_channel", "int4_channel_asym", "fp4_e2m1_channel"])
def test_packed_formats_round_trip(tmp_path: Path, fmt: str) -> None:
    """Packed INT4 (pack-quantized, with zero points) and FP4 (ptq's layout): every conv
    decodes to its emulated weight bit for bit, so the reload computes the same."""
    from ptq.formats.names import parse_format

    source = _source(tmp_path)
    images = write_images(tmp_path / "images")
    s = get_scheme("w8a16").with_overrides(weight=parse_format(fmt))
    _write(source, s, "gptq", images, tmp_path / "out")
    assert verify_output(tmp_path / "out").layers == 5
    reloaded, _ = load_quantized_model(tmp_path / "out", trust_remote_code=True)
    memory = _in_memory(source, s, "gptq", images)
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(reloaded(x), memory(x))


def test_static_activation_scales_of_convs_are_calibrated_and_written(tmp_path: Path) -> None:
    from ptq.scheme import get_activation

    source = _source(tmp_path)
    images = write_images(tmp_path / "images")
    s = get_scheme("w8a8").with_overrides(activation=get_activation("int8_tensor_static"))
    result = _write(source, s, "rtn", images, tmp_path / "out")
    scales = result.records["act_calibration"]["input_scale"]
    assert sorted(scales) == ["dw", "head", "pw", "seq", "stem"]
    manifest = json.loads((tmp_path / "out" / "ptq_manifest.json").read_text())
    assert sum(n.endswith(".input_scale") for n in manifest["tensors"]) == 5
    reloaded, _ = load_quantized_model(tmp_path / "out", trust_remote_code=True)
    memory = _in_memory(source, s, "rtn", images)
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(reloaded(x), memory(x))


def test_nothing_is_written_when_a_run_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ptq.errors import PtqPassError
    from ptq.exporters.safetensors_export import CompressedTensorsOutput

    source = _source(tmp_path)
    images = write_images(tmp_path / "images")
    stored = CompressedTensorsOutput.stored

    def nan_head(self: CompressedTensorsOutput, name: str, t: torch.Tensor) -> None:
        stored(self, name, torch.full_like(t, float("nan")) if name == "head.bias" else t)

    monkeypatch.setattr(CompressedTensorsOutput, "stored", nan_head)
    with pytest.raises(PtqPassError, match="'head.bias' holds .* NaN"):
        ptq.quantize(
            source,
            "w8a16",
            output=tmp_path / "out",
            calibration=CalibrationConfig(path=images, samples=2),
            trust_remote_code=True,
            progress=False,
            log=lambda *_: None,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["factory", "images"]


def test_module_source_needs_output(tmp_path: Path) -> None:
    from ptq.errors import PtqUsageError

    with pytest.raises(PtqUsageError, match="give output"):
        ptq.quantize(_source(tmp_path), "w8a16")
