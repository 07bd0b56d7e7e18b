"""``ptq verify``: a good output passes; each kind of corruption fails naming the culprit."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ptq.api import quantize
from ptq.errors import PtqInputError
from ptq.exporters.manifest import MANIFEST_FILE, write_manifest
from ptq.verify import verify, verify_output


@pytest.fixture(scope="module")
def good_output(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "w4a16"
    quantize(tiny_llama, "w4a16", output=out, progress=False, log=lambda *a: None)
    write_manifest(out)  # idempotent: also right once the exporter writes it itself
    return out


@pytest.fixture()
def output(good_output: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(good_output, copy)
    return copy


def _rewrite(out: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change tensors and write a consistent manifest (an exporter bug, not disk damage)."""
    path = out / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    write_manifest(out)


def _scale_name(out: Path) -> str:
    names = json.loads((out / MANIFEST_FILE).read_text())["tensors"]
    return next(n for n in sorted(names) if n.endswith("q_proj.weight_scale"))


def test_good_output_passes(output: Path) -> None:
    report = verify_output(output)
    assert report.layers == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert report.tensors == len(json.loads((output / MANIFEST_FILE).read_text())["tensors"])
    result = CliRunner().invoke(verify, [str(output)])
    assert result.exit_code == 0, result.output
    assert "14 quantized layers dequantize" in result.output


def test_manifest_lists_files_and_tensors(output: Path) -> None:
    manifest = json.loads((output / MANIFEST_FILE).read_text())
    assert {"config.json", "model.safetensors", "ptq_plan.json"} <= set(manifest["files"])
    assert MANIFEST_FILE not in manifest["files"]
    scale = manifest["tensors"][_scale_name(output)]
    assert scale["file"] == "model.safetensors"
    assert scale["dtype"] == "F32"
    assert scale["shape"] == [64, 1]  # group rule: 64 inputs -> group 64 -> one group


def test_flipped_byte_is_a_checksum_mismatch(output: Path) -> None:
    path = output / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(PtqInputError, match=r"model\.safetensors: sha256 checksum mismatch"):
        verify_output(output)
    result = CliRunner().invoke(verify, [str(output)])
    assert result.exit_code == 2
    assert "model.safetensors" in result.output and "checksum" in result.output


def test_truncated_file_is_a_size_mismatch(output: Path) -> None:
    path = output / "config.json"
    path.write_text(path.read_text()[:-10])
    with pytest.raises(PtqInputError, match=r"config\.json: size"):
        verify_output(output)


def test_deleted_shard_is_named(output: Path) -> None:
    (output / "model.safetensors").unlink()
    with pytest.raises(PtqInputError, match=r"model\.safetensors: listed in .* but missing"):
        verify_output(output)


def test_extra_file_is_named(output: Path) -> None:
    (output / "stray.bin").write_bytes(b"x")
    with pytest.raises(PtqInputError, match=r"stray\.bin: not listed"):
        verify_output(output)


def test_missing_manifest(output: Path) -> None:
    (output / MANIFEST_FILE).unlink()
    with pytest.raises(PtqInputError, match="no ptq_manifest.json"):
        verify_output(output)


def test_zeroed_scale_is_named(output: Path) -> None:
    name = _scale_name(output)

    def zero(t: dict[str, torch.Tensor]) -> None:
        t[name].zero_()

    _rewrite(output, zero)
    with pytest.raises(PtqInputError, match=rf"tensor '{name}' is all zeros"):
        verify_output(output)


def test_nan_in_scale_is_named(output: Path) -> None:
    name = _scale_name(output)

    def inject(t: dict[str, torch.Tensor]) -> None:
        t[name][3, 0] = float("nan")

    _rewrite(output, inject)
    with pytest.raises(PtqInputError, match=rf"tensor '{name}' holds 1 NaN/Inf"):
        verify_output(output)


def test_zero_bias_is_allowed(output: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.bias"

    def add_bias(t: dict[str, torch.Tensor]) -> None:
        t[name] = torch.zeros(64)

    _rewrite(output, add_bias)
    verify_output(output)


def test_wrong_shape_in_manifest(output: Path) -> None:
    manifest = json.loads((output / MANIFEST_FILE).read_text())
    name = _scale_name(output)
    manifest["tensors"][name]["shape"] = [64, 2]
    (output / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(PtqInputError, match=rf"tensor '{name}' has shape \[64, 1\]"):
        verify_output(output)


def test_undecodable_layer_is_named(output: Path) -> None:
    packed = "model.layers.1.mlp.down_proj.weight_packed"
    _rewrite(output, lambda t: t.__setitem__(packed, t[packed][:, :-1].contiguous()))
    with pytest.raises(PtqInputError, match=r"layer model\.layers\.1\.mlp\.down_proj"):
        verify_output(output)


def test_config_target_without_weights(output: Path) -> None:
    cfg = json.loads((output / "config.json").read_text())
    group = next(iter(cfg["quantization_config"]["config_groups"].values()))
    group["targets"].append("model.layers.7.mlp.up_proj")
    (output / "config.json").write_text(json.dumps(cfg))
    write_manifest(output)
    with pytest.raises(PtqInputError, match=r"targets 'model\.layers\.7\.mlp\.up_proj'"):
        verify_output(output)
