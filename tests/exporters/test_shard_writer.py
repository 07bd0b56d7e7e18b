"""The streaming shard writer: save_file's bytes, shards, resume, faults leave nothing."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ptq.api import quantize
from ptq.errors import PtqError
from ptq.exporters import shard_writer
from ptq.exporters.shard_writer import ShardFiles, ShardWriter
from ptq.io.safetensors_reader import SafetensorsIndex


def _tensors() -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(f"layer{i}.weight", torch.randn(32, 64, generator=g)) for i in range(5)]


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, generator=g)
    return {
        "z.f32": x,
        "a.bf16": x.bfloat16(),
        "m.f16": x.half(),
        "b.i32": (x * 100).int(),
        "c.u8": (x.abs() * 10).to(torch.uint8),
        "d.i8": (x * 10).to(torch.int8),
        "e.f8": x.to(torch.float8_e4m3fn),
        "f.f64": x.double(),
        "g.i64": torch.arange(4),
        "h.bool": x > 0,
    }


def _writer(tmp: Path, **kw: object) -> tuple[ShardWriter, Path]:
    work, out = tmp / "work", tmp / "out"
    work.mkdir(parents=True)
    out.mkdir(parents=True)
    return ShardWriter(work, **kw), out  # type: ignore[arg-type]


def test_single_shard_is_byte_identical_to_save_file(tmp_path: Path) -> None:
    """Tensors streamed in any order give exactly safetensors' save_file bytes."""
    tensors = _mixed()
    writer, out = _writer(tmp_path)
    for name in reversed(list(tensors)):
        writer.add(name, tensors[name])
    assert writer.finish(out) == ["model.safetensors"]
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not (out / "model.safetensors.index.json").exists()


def test_shards_and_index_round_trip(tmp_path: Path) -> None:
    writer, out = _writer(tmp_path, max_shard_bytes=2 * 32 * 64 * 4)
    writer.add_all(_tensors())
    files = writer.finish(out)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = SafetensorsIndex(out)
    for name, t in _tensors():
        assert torch.equal(index.get(name), t)


def test_restore_cuts_what_came_after_the_snapshot(tmp_path: Path) -> None:
    """A resumed run rewrites what followed its checkpoint and ends with the same bytes."""
    tensors = _tensors()
    ref, ref_out = _writer(tmp_path / "a", max_shard_bytes=2 * 32 * 64 * 4)
    ref.add_all(tensors)
    ref.finish(ref_out)
    writer, out = _writer(tmp_path / "b", max_shard_bytes=2 * 32 * 64 * 4)
    writer.add_all(tensors[:3])
    state = writer.state()
    writer.add_all(tensors[3:4])  # written, then lost in a crash
    again = ShardWriter(tmp_path / "b" / "work", max_shard_bytes=2 * 32 * 64 * 4)
    again.restore(state)
    assert tensors[3][0] not in again and tensors[2][0] in again
    again.add_all(tensors[3:])
    again.finish(out)
    for f in ref_out.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_repeated_and_empty_tensors_are_refused(tmp_path: Path) -> None:
    writer, _ = _writer(tmp_path)
    writer.add("x", torch.ones(2))
    with pytest.raises(PtqError, match="written twice"):
        writer.add("x", torch.ones(2))
    with pytest.raises(PtqError, match="refusing to write x.bias: it is empty"):
        writer.add("x.bias", torch.zeros(0))


def _fail_on_call(n: int, code: int) -> tuple[list[Path], object]:
    calls: list[Path] = []
    real = ShardFiles.write_shard

    def write_shard(self: ShardFiles, path: Path, *args: object) -> None:
        calls.append(path)
        if len(calls) == n:
            path.write_bytes(b"partial")  # a real failure leaves a partial file behind
            raise OSError(code, "injected")
        real(self, path, *args)  # type: ignore[arg-type]

    return calls, write_shard


def test_enospc_at_second_shard_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, fail = _fail_on_call(2, errno.ENOSPC)
    monkeypatch.setattr(ShardFiles, "write_shard", fail)
    writer, out = _writer(tmp_path, max_shard_bytes=2 * 32 * 64 * 4)
    writer.add_all(_tensors())
    needed = writer.needed_bytes()
    with pytest.raises(PtqError, match=r"disk filled up while writing model-00002-of-00003") as ei:
        writer.finish(out)
    assert f"needs {needed / 1e6:.1f} MB" in str(ei.value) and "MB free" in str(ei.value)
    assert len(calls) == 2
    assert list(out.iterdir()) == []


def test_too_little_space_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, fail = _fail_on_call(99, errno.ENOSPC)
    monkeypatch.setattr(ShardFiles, "write_shard", fail)
    monkeypatch.setattr(shard_writer, "free_bytes", lambda _p: 500_000)
    writer, out = _writer(tmp_path)
    writer.add_all(_tensors())
    needed = writer.needed_bytes(10_000_000)
    with pytest.raises(PtqError, match=rf"needs {needed / 1e6:.1f} MB, 0\.5 MB free"):
        writer.finish(out, extra_bytes=10_000_000)
    assert calls == [] and list(out.iterdir()) == []


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_disk_full_during_export_keeps_previous_output(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    quiet = {"progress": False, "log": lambda *a: None}
    quantize(tiny_llama, "w4a16", output=out, **quiet)  # type: ignore[arg-type]
    before = _digests(out)
    calls, fail = _fail_on_call(1, errno.ENOSPC)
    monkeypatch.setattr(ShardFiles, "write_shard", fail)
    with pytest.raises(PtqError, match=r"needs \d+\.\d MB, \d+\.\d MB free"):
        quantize(tiny_llama, "w8a16", output=out, overwrite=True, **quiet)  # type: ignore[arg-type]
    assert len(calls) == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".out.work", "out"]  # no partial or backup folder; the resumable work
    assert _digests(out) == before
