"""Shard writing under faults: no partial files, the previous output survives."""

from __future__ import annotations

import errno
import functools
import hashlib
from pathlib import Path

import pytest
import torch

from ptq.api import quantize
from ptq.errors import PtqError
from ptq.exporters import safe_write
from ptq.exporters.safe_write import ShardWriter, estimate_bytes, write_shards
from ptq.io.safetensors_reader import SafetensorsIndex


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(f"layer{i}.weight", torch.randn(32, 64, generator=g)) for i in range(5)]


def _fail_on_call(n: int, code: int) -> tuple[list[Path], object]:
    calls: list[Path] = []
    real = ShardWriter.save

    def save(self: ShardWriter, tensors: dict[str, torch.Tensor], path: Path) -> None:
        calls.append(path)
        if len(calls) == n:
            path.write_bytes(b"partial")  # a real failure leaves a partial file behind
            raise OSError(code, "injected")
        real(self, tensors, path)

    return calls, save


def test_shards_and_index_round_trip(tmp_path: Path) -> None:
    tensors = _tensors()
    files = write_shards(iter(tensors), tmp_path, max_shard_bytes=2 * 32 * 64 * 4)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = SafetensorsIndex(tmp_path)
    for name, t in tensors:
        assert torch.equal(index.get(name), t)


def test_single_file_without_index(tmp_path: Path) -> None:
    assert write_shards(iter(_tensors()), tmp_path) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_enospc_at_second_shard_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, save = _fail_on_call(2, errno.ENOSPC)
    monkeypatch.setattr(ShardWriter, "save", save)
    needed = estimate_bytes(_tensors())
    with pytest.raises(PtqError, match=r"disk filled up while writing model-00002-of-00003") as ei:
        write_shards(iter(_tensors()), tmp_path, max_shard_bytes=2 * 32 * 64 * 4)
    assert f"needs {needed / 1e6:.1f} MB" in str(ei.value) and "MB free" in str(ei.value)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_other_write_error_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, save = _fail_on_call(1, errno.EIO)
    monkeypatch.setattr(ShardWriter, "save", save)
    with pytest.raises(PtqError, match=r"writing model\.safetensors failed"):
        write_shards(iter(_tensors()), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_too_little_space_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, save = _fail_on_call(99, errno.ENOSPC)
    monkeypatch.setattr(ShardWriter, "save", save)
    monkeypatch.setattr(safe_write, "free_bytes", lambda _p: 500_000)
    needed = estimate_bytes(_tensors(), extra=10_000_000)
    with pytest.raises(PtqError, match=rf"needs {needed / 1e6:.1f} MB, 0\.5 MB free"):
        write_shards(iter(_tensors()), tmp_path, extra_bytes=10_000_000)
    assert calls == [] and list(tmp_path.iterdir()) == []


def test_empty_tensor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PtqError, match="refusing to write x.bias: it is empty"):
        write_shards(iter([("x.bias", torch.zeros(0))]), tmp_path)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_disk_full_during_export_keeps_previous_output(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    quiet = {"progress": False, "log": lambda *a: None}
    quantize(tiny_llama, "w4a16", output=out, **quiet)  # type: ignore[arg-type]
    before = _digests(out)
    small = functools.partial(write_shards, max_shard_bytes=60_000)
    monkeypatch.setattr("ptq.exporters.safetensors_export.write_shards", small)
    calls, save = _fail_on_call(2, errno.ENOSPC)
    monkeypatch.setattr(ShardWriter, "save", save)
    with pytest.raises(PtqError, match=r"needs \d+\.\d MB, \d+\.\d MB free"):
        quantize(tiny_llama, "w8a16", output=out, overwrite=True, **quiet)  # type: ignore[arg-type]
    assert len(calls) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial or backup folder
    assert _digests(out) == before
