"""``ptq generate`` on CPU: the packed reference ops reproduce the emulated model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ptq.api import quantize
from ptq.exporters.cuda.generate import generate_text, to_packed_ops
from ptq.exporters.cuda.linear import QLinear
from ptq.formats import INT5, PerGroup, QuantFormat
from ptq.formats.presets import get_preset
from ptq.models.quantized_loader import load_quantized_model
from ptq.scheme import get_scheme


def test_packed_ops_match_emulation_and_generate(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    quantize(tiny_llama, "w4a16", output=out, progress=False, log=lambda *_: None)
    emulated, _ = load_quantized_model(out)
    packed, _ = load_quantized_model(out)
    swapped, kept = to_packed_ops(packed)
    assert swapped == 14 and kept == 0
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = emulated(input_ids=ids).logits, packed(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert (a.argmax(-1) == b.argmax(-1)).all()
    text, n, _ = generate_text(out, "the king", max_new_tokens=5)
    assert n == 14 and isinstance(text, str)


@pytest.mark.parametrize(
    ("weight", "name"),
    [
        (get_preset("int3_g64"), "int3"),
        (QuantFormat(INT5, PerGroup(32), symmetric=False, scale_format="fp16"), "int5"),
        (get_preset("mxfp6_e3m2"), "fp6_e3m2"),
    ],
    ids=["int3_g64", "int5_g32_asym", "mxfp6_e3m2"],
)
def test_ptq_layout_outputs_run_on_bitstream_ops(
    tiny_llama: Path, tmp_path: Path, weight: QuantFormat, name: str
) -> None:
    out = tmp_path / "o"
    scheme = get_scheme("w4a16").with_overrides(weight=weight)
    quantize(tiny_llama, scheme, output=out, progress=False, log=lambda *_: None)
    emulated, _ = load_quantized_model(out)
    packed, _ = load_quantized_model(out)
    assert to_packed_ops(packed) == (14, 0)
    stored: dict[str, torch.Tensor] = {}
    for shard in out.glob("*.safetensors"):
        stored.update(load_file(shard))
    layers = {n: m for n, m in packed.named_modules() if isinstance(m, QLinear)}
    for layer_name, layer in layers.items():  # the op reads the exported bytes as they are
        assert layer.format == name
        assert torch.equal(layer.weight, stored[f"{layer_name}.weight_packed"])
        assert torch.equal(layer.weight_scale, stored[f"{layer_name}.weight_scale"])
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = emulated(input_ids=ids).logits, packed(input_ids=ids).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_generate_cli_rejects_non_output(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = run_cli("generate", str(tmp_path), "--prompt", "x")
    assert r.exit_code == 2 and "not a ptq output" in r.output
