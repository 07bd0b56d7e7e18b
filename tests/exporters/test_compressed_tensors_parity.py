"""The exported checkpoint decompresses, with compressed-tensors itself, to our weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ptq.api import quantize
from ptq.models.quantized_loader import load_quantized_model
from ptq.qlinear import QuantLinear

ct = pytest.importorskip("compressed_tensors")


def _decompress(fmt_name: str, local: dict[str, torch.Tensor], group: dict) -> torch.Tensor:  # type: ignore[type-arg]
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(
        targets=group["targets"],
        weights=group["weights"],
        input_activations=group["input_activations"],
    )
    compressor = BaseCompressor.get_value_from_registry(fmt_name)
    out = compressor.decompress(local, scheme)
    return out["weight"]


@pytest.mark.parametrize("scheme", ["w4a16", "w4a8", "w8a8", "fp8"])
def test_every_weight_decompresses_bit_exact(tiny_llama: Path, tmp_path: Path, scheme: str) -> None:
    out = tmp_path / scheme
    quantize(tiny_llama, scheme, output=out, progress=False, log=lambda *_: None)
    # the emulation: the same run kept in memory instead of streamed to the output
    result = quantize(tiny_llama, scheme, progress=False, log=lambda *_: None)
    assert result.model is not None
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    # the config parses with compressed-tensors' own schema
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(qc)
    tensors = load_file(str(out / "model.safetensors"))
    emulated = {n: m for n, m in result.model.named_modules() if isinstance(m, QuantLinear)}
    checked = 0
    for group in qc["config_groups"].values():
        for name in group["targets"]:
            local = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
            weight = _decompress(group["format"], local, group)
            ours = emulated[name].weight.detach()
            assert weight.dtype == ours.dtype, name
            assert torch.equal(weight, ours), name
            checked += 1
    assert checked == len(emulated) == 14


def test_reloaded_output_matches_in_memory_model(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    quantize(tiny_llama, "w4a8", output=out, progress=False, log=lambda *_: None)
    result = quantize(tiny_llama, "w4a8", progress=False, log=lambda *_: None)
    assert result.model is not None
    reloaded, tok = load_quantized_model(out)
    assert tok is not None
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = result.model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert torch.equal(a, b)
    for fname in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "ptq_plan.json",
    ):
        assert (out / fname).is_file(), fname


@pytest.mark.parametrize(
    ("scheme", "fmt"),
    [("w8a8", "int-quantized"), ("w8a16", "pack-quantized"), ("w4a8", "pack-quantized")],
)
def test_w8a8_is_int_quantized_and_producer_is_a_mapping(
    tiny_llama: Path, tmp_path: Path, scheme: str, fmt: str
) -> None:
    """vLLM routes INT8 W8A8 to its W8A8 kernels only as int-quantized, and calls
    ``.get`` on ``producer`` (a string made it fail at start-up)."""
    out = tmp_path / scheme
    quantize(tiny_llama, scheme, output=out, progress=False, log=lambda *_: None)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == fmt
    assert {g["format"] for g in qc["config_groups"].values()} == {fmt}
    assert isinstance(qc["producer"], dict) and qc["producer"]["name"] == "ptq"
    if fmt == "int-quantized":
        tensors = load_file(str(out / "model.safetensors"))
        name = "model.layers.0.mlp.down_proj"
        assert tensors[f"{name}.weight"].dtype == torch.int8
        assert f"{name}.weight_packed" not in tensors
