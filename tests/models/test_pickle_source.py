"""Pickle checkpoints are refused by default, converted only through weights_only loading,
and no code from a model folder runs without trust_remote_code."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ptq.errors import PtqInputError
from ptq.io.safetensors_reader import SafetensorsIndex
from ptq.models.pickle_source import convert_pickle_folder
from ptq.models.source import load_fp_model, resolve_model


class Evil:
    """Unpickling this runs a shell command (if the loader lets it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)


def _pickle_folder(src: Path, dest: Path, shards: int = 1) -> Path:
    dest.mkdir()
    state = load_file(src / "model.safetensors")
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, dest / f.name)
    if shards == 1:
        torch.save(state, dest / "pytorch_model.bin")
        return dest
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, dest / name)
        weight_map.update(dict.fromkeys(part, name))
    (dest / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dest


def test_pickle_folder_refused_by_default(tiny_llama: Path, tmp_path: Path) -> None:
    folder = _pickle_folder(tiny_llama, tmp_path / "m")
    with pytest.raises(PtqInputError, match="pytorch_model.bin.*--allow-pickle"):
        resolve_model(folder)


def test_converted_folder_loads_the_same_model(tiny_llama: Path, tmp_path: Path) -> None:
    folder = _pickle_folder(tiny_llama, tmp_path / "m")
    out = convert_pickle_folder(folder, cache=tmp_path / "cache")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.bin"))
    assert convert_pickle_folder(folder, cache=tmp_path / "cache") == out  # cached
    ref, _ = load_fp_model(resolve_model(tiny_llama))
    got, tok = load_fp_model(resolve_model(out))
    assert tok is not None
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)


def test_sharded_pickle_becomes_sharded_safetensors(tiny_llama: Path, tmp_path: Path) -> None:
    folder = _pickle_folder(tiny_llama, tmp_path / "m", shards=2)
    out = convert_pickle_folder(folder, cache=tmp_path / "cache")
    index = SafetensorsIndex(out)
    state = load_file(tiny_llama / "model.safetensors")
    assert set(index) == set(state)
    assert (out / "model-00002-of-00002.safetensors").is_file()
    for k, v in state.items():
        assert torch.equal(index.get(k), v)


@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_malicious_pickle_refused_even_when_allowed(
    tiny_llama: Path, tmp_path: Path, kind: str
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy2(tiny_llama / "config.json", folder / "config.json")
    marker = tmp_path / "pwned"
    payload = {"model.embed_tokens.weight": torch.zeros(2, 2), "evil": Evil(marker)}
    if kind == "torch_save":
        torch.save(payload, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(payload))
    with pytest.raises(
        PtqInputError, match=r"pytorch_model\.bin: torch.load\(weights_only=True\) refused"
    ):
        convert_pickle_folder(folder, cache=tmp_path / "cache")
    assert not marker.exists()
    assert not list((tmp_path / "cache").glob("*/config.json"))


def _remote_code_folder(src: Path, dest: Path, model_type: str, marker: Path) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    (dest / "config.json").write_text(json.dumps(cfg))
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (dest / name).write_text(code)
    return dest


def test_known_architecture_ignores_auto_map_without_trust(
    tiny_llama: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    folder = _remote_code_folder(tiny_llama, tmp_path / "m", "llama", marker)
    model, _ = load_fp_model(resolve_model(folder), trust_remote_code=False)
    assert type(model).__module__.startswith("transformers.models.llama")
    assert not marker.exists()


def test_unknown_architecture_needs_trust(tiny_llama: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    folder = _remote_code_folder(tiny_llama, tmp_path / "m", "evilnet", marker)
    with pytest.raises(PtqInputError, match=r"(?s)config\.json.*trust_remote_code"):
        load_fp_model(resolve_model(folder), trust_remote_code=False)
    assert not marker.exists()
