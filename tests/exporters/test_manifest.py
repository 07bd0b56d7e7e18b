"""ptq_manifest.json: contents, and refusing tensors that must never be written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ptq.errors import PtqError, PtqInputError
from ptq.exporters.manifest import (
    MANIFEST_FILE,
    build_manifest,
    check_tensor,
    read_manifest,
    write_manifest,
)


def test_check_tensor_refuses_empty_and_meta() -> None:
    check_tensor("ok", torch.zeros(2, 3))
    with pytest.raises(PtqError, match=r"refusing to write layer\.w: it is empty \(shape \[0, 4\]"):
        check_tensor("layer.w", torch.zeros(0, 4))
    with pytest.raises(PtqError, match="refusing to write m.x: it is on the meta device"):
        check_tensor("m.x", torch.empty(2, device="meta"))


def test_manifest_records_files_and_tensors(tmp_path: Path) -> None:
    save_file(
        {"a": torch.ones(2, 3), "b": torch.arange(4, dtype=torch.int32)}, tmp_path / "s.safetensors"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "note.txt").write_text("hello")
    write_manifest(tmp_path)
    data = read_manifest(tmp_path)
    assert set(data["files"]) == {"s.safetensors", "sub/note.txt"}
    assert data["files"]["sub/note.txt"] == {
        "size": 5,
        "sha256": hashlib.sha256(b"hello").hexdigest(),
    }
    assert data["tensors"]["a"] == {"dtype": "F32", "shape": [2, 3], "file": "s.safetensors"}
    assert data["tensors"]["b"] == {"dtype": "I32", "shape": [4], "file": "s.safetensors"}
    write_manifest(tmp_path)  # rewriting does not list the manifest itself
    assert MANIFEST_FILE not in build_manifest(tmp_path)["files"]


def test_read_manifest_rejects_malformed(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text(
        json.dumps({"version": 1, "files": {"x": {}}, "tensors": {}})
    )
    with pytest.raises(PtqInputError, match="entry for file 'x'"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(PtqInputError, match="not valid JSON"):
        read_manifest(tmp_path)
