"""``ptq quantize --weight-format`` works end to end for formats with and without a
compressed-tensors layout: export, reload, identical emulated weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ptq.api import quantize
from ptq.formats.presets import get_preset
from ptq.models.quantized_loader import load_quantized_model
from ptq.qlinear import QuantLinear
from ptq.scheme import get_scheme


@pytest.mark.parametrize(
    ("preset", "ct_format"),
    [
        ("nvfp4", "nvfp4-pack-quantized"),
        ("mxfp4", "mxfp4-pack-quantized"),
        ("mxfp8", "mxfp8-quantized"),
        ("fp8_block128", "float-quantized"),
        ("mxfp6_e2m3", "ptq-packed"),
        ("int3_g64", "ptq-packed"),
    ],
)
def test_weight_format_round_trips(
    tiny_llama: Path, tmp_path: Path, preset: str, ct_format: str
) -> None:
    scheme = get_scheme("w4a16").with_overrides(weight=get_preset(preset))
    out = tmp_path / preset
    quantize(tiny_llama, scheme, output=out, progress=False, log=lambda *_: None)
    result = quantize(tiny_llama, scheme, progress=False, log=lambda *_: None)  # in memory
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {g["format"] for g in qc["config_groups"].values()} == {ct_format}
    reloaded, _ = load_quantized_model(out)
    assert result.model is not None
    ours = {n: m.weight for n, m in result.model.named_modules() if isinstance(m, QuantLinear)}
    back = {n: m.weight for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == back.keys() and len(ours) == 14
    for name in ours:
        assert torch.equal(ours[name], back[name]), name
