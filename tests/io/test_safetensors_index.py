"""Sharded checkpoints: the index, its shards and their agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ptq.errors import PtqInputError
from ptq.io.safetensors_reader import INDEX_FILE, SafetensorsIndex


def _sharded(root: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    shards = {
        "model-00001-of-00002.safetensors": {
            "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
            "model.layers.0.mlp.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        },
        "model-00002-of-00002.safetensors": {
            "model.layers.1.mlp.weight": torch.randn(4, 4, generator=g),
            "lm_head.weight": torch.randn(10, 4, generator=g),
        },
    }
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, str(root / shard))
        weight_map.update(dict.fromkeys(tensors, shard))
    (root / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return {k: v for t in shards.values() for k, v in t.items()}


def test_sharded_index_reads_every_tensor(tmp_path: Path) -> None:
    want = _sharded(tmp_path)
    index = SafetensorsIndex(tmp_path)
    assert sorted(index.keys()) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(index.get(name), tensor)
        assert index.shape(name) == tuple(tensor.shape)
        assert index.dtype(name) == tensor.dtype
    assert index.names_with_prefix("model.layers.1.") == ["model.layers.1.mlp.weight"]
    assert len(index) == 4 and "lm_head.weight" in index


def test_single_file_and_glob(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    assert SafetensorsIndex(tmp_path).keys() == ["a"]
    other = tmp_path / "other"
    other.mkdir()
    save_file({"a": torch.ones(2)}, str(other / "x.safetensors"))
    save_file({"b": torch.zeros(3)}, str(other / "y.safetensors"))
    assert sorted(SafetensorsIndex(other).keys()) == ["a", "b"]


def test_missing_shard(tmp_path: Path) -> None:
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        PtqInputError, match=r"shard 'model-00002-of-00002\.safetensors' is missing"
    ):
        SafetensorsIndex(tmp_path)


def test_tensor_in_index_missing_from_shard(tmp_path: Path) -> None:
    _sharded(tmp_path)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(PtqInputError, match=r"model-00001-of-00002.*'model\.norm\.weight'"):
        SafetensorsIndex(tmp_path)


def test_duplicate_name_across_shards(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2), "a": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(
        PtqInputError, match=r"'w' is in both 'a\.safetensors' and 'b\.safetensors'"
    ):
        SafetensorsIndex(tmp_path)


def test_duplicate_with_index_present(tmp_path: Path) -> None:
    _sharded(tmp_path)
    save_file(
        {"lm_head.weight": torch.ones(10, 4), "model.embed_tokens.weight": torch.ones(10, 4)},
        str(tmp_path / "model-00001-of-00002.safetensors"),
    )
    with pytest.raises(PtqInputError, match="is in both"):
        SafetensorsIndex(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x"])
def test_index_shard_names_cannot_escape(tmp_path: Path, shard: str) -> None:
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(PtqInputError, match="unsafe"):
        SafetensorsIndex(tmp_path)


@pytest.mark.parametrize(
    "text", ["{", "[]", '{"weight_map": []}', '{"weight_map": {"w": 3}}', '{"weight_map": {}}']
)
def test_bad_index_json(tmp_path: Path, text: str) -> None:
    (tmp_path / INDEX_FILE).write_text(text)
    with pytest.raises(PtqInputError, match=INDEX_FILE.replace(".", r"\.")):
        SafetensorsIndex(tmp_path)


def test_corrupt_shard_is_named(tmp_path: Path) -> None:
    _sharded(tmp_path)
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(PtqInputError, match="model-00002-of-00002"):
        SafetensorsIndex(tmp_path)


def test_empty_dir_and_unknown_tensor(tmp_path: Path) -> None:
    with pytest.raises(PtqInputError, match=r"no model\.safetensors\.index\.json"):
        SafetensorsIndex(tmp_path)
    _sharded(tmp_path)
    with pytest.raises(PtqInputError, match=r"'model\.norm\.weight'"):
        SafetensorsIndex(tmp_path).get("model.norm.weight")
