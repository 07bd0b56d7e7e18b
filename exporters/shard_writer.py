"""The one checkpoint writer: tensors stream into safetensors shards, block by block.

The runner hands each finished block's tensors to :class:`ShardWriter`, which appends
their bytes to a *spool* file in the run's work folder and keeps only a table of
``name -> (dtype, shape, byte range)`` in memory; a spool that reaches
``max_shard_bytes`` is closed and a new one begun (Hugging Face's 2 GiB shards). When
the run is complete, :meth:`ShardWriter.finish` turns every spool into its shard file:
the safetensors header, then the tensors' bytes copied from the spool in the header's
order, in bounded chunks. The header and order are exactly what ``safetensors``'
``save_file`` writes for the same tensors (tensors sorted by dtype, then name; compact
JSON padded with spaces to 8 bytes), so a model written block by block has the bytes a
whole-model ``save_file`` would have given.

Resuming: :meth:`ShardWriter.state` is a JSON-able snapshot (spool names, lengths and
tables) that the runner stores with each checkpoint; :meth:`ShardWriter.restore` cuts
the current spool back to its recorded length, so tensors written after the last
checkpoint are written again, identically.

Disk space: before the shards are assembled the exact output size is known and checked
against the free space (``needs X MB, Y MB free``); if the disk still fills up (ENOSPC,
EDQUOT) every shard written so far is removed and a :class:`~ptq.errors.PtqError` says
so. The bytes hit the disk in :meth:`ShardFiles.write_shard` (tests inject faults there).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

import torch
from safetensors.torch import save

from ptq.errors import PtqError
from ptq.exporters.manifest import check_tensor

__all__ = [
    "INDEX_FILE",
    "MAX_SHARD_BYTES",
    "ShardFiles",
    "ShardWriter",
    "check_free_space",
    "free_bytes",
]

MAX_SHARD_BYTES: Final = 2 * 1024**3
HEADER_PER_TENSOR: Final = 96
OVERHEAD: Final = 1 << 20
COPY_CHUNK: Final = 64 << 20
INDEX_FILE: Final = "model.safetensors.index.json"
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def free_bytes(target: Path) -> int:
    """Free bytes on the filesystem that holds ``target`` (or its nearest existing parent)."""
    probe = target.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_free_space(target: Path, needed: int) -> None:
    """Refuse early when ``target``'s filesystem has less than ``needed`` bytes free.

    Raises:
        PtqError: "``target``: writing the output needs X MB, Y MB free".
    """
    free = free_bytes(target)
    if free < needed:
        raise PtqError(
            f"{target}: writing the output needs {_mb(needed)}, {_mb(free)} free; "
            "free some space or choose another output folder"
        )


@dataclass
class _Entry:
    name: str
    dtype: str
    shape: list[int]
    begin: int
    end: int


@dataclass
class _Spool:
    file: str
    entries: list[_Entry] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.entries[-1].end if self.entries else 0


def _dtype_names(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """``(name, safetensors dtype)`` in the order ``save_file`` lays them out.

    ``safetensors`` sorts by dtype (its own enum order, descending) and then by name;
    serializing one-element stand-ins of the same dtypes reads that order off the
    library itself instead of restating it here.
    """
    probe = {n: torch.zeros(1, dtype=t.dtype) for n, t in tensors.items()}
    blob = save(probe)
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    header.pop("__metadata__", None)
    return [(n, str(v["dtype"])) for n, v in header.items()]


def _header_bytes(order: list[_Entry]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in order:
        n = e.end - e.begin
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardFiles:
    """Where shard bytes hit the disk (one method, so tests can inject faults)."""

    def write_shard(self, path: Path, header: bytes, spool: Path, order: list[_Entry]) -> None:
        """Write ``header`` then each entry's bytes, copied from ``spool`` in ``order``."""
        with path.open("wb") as out, spool.open("rb") as src:
            out.write(header)
            for e in order:
                _copy_range(src, out, e.begin, e.end - e.begin)

    def write_text(self, path: Path, text: str) -> None:
        """Write a small text file (the shard index)."""
        path.write_text(text)


def _copy_range(src: BinaryIO, dst: BinaryIO, begin: int, n: int) -> None:
    src.seek(begin)
    while n > 0:
        chunk = src.read(min(n, COPY_CHUNK))
        if not chunk:
            raise PtqError(f"{src.name}: spool file ends early; rerun with --restart")
        dst.write(chunk)
        n -= len(chunk)


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


class ShardWriter:
    """Streams named tensors into spool files; :meth:`finish` writes the shards.

    Args:
        work: The run's work folder (spools live here; same filesystem as the output).
        max_shard_bytes: Tensor bytes per shard (a larger single tensor gets its own).
        files: Where the final bytes go (tests replace it to inject faults).
    """

    def __init__(
        self,
        work: Path,
        *,
        max_shard_bytes: int = MAX_SHARD_BYTES,
        files: ShardFiles | None = None,
    ) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
        self.work = work
        self.max_shard_bytes = max_shard_bytes
        self.files = files or ShardFiles()
        self._spools: list[_Spool] = []
        self._names: set[str] = set()

    def __contains__(self, name: object) -> bool:
        return name in self._names

    @property
    def names(self) -> set[str]:
        """Every tensor name written so far."""
        return set(self._names)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` under ``name`` (a name already written is an error).

        Raises:
            PtqError: A meta or empty tensor, a repeated name, or a full disk.
        """
        check_tensor(name, tensor)
        if name in self._names:
            raise PtqError(f"tensor {name} is written twice: an exporter bug")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if not self._spools or (
            self._spools[-1].nbytes and self._spools[-1].nbytes + nbytes > self.max_shard_bytes
        ):
            self._spools.append(_Spool(file=f"spool-{len(self._spools):05d}.bin"))
            (self.work / self._spools[-1].file).write_bytes(b"")
        spool = self._spools[-1]
        begin = spool.nbytes
        path = self.work / spool.file
        try:
            with path.open("r+b") as f:
                f.seek(begin)
                if nbytes:
                    f.write(cast(Any, t.reshape(-1).view(torch.uint8).numpy()))
        except OSError as exc:
            raise self._disk_error(exc, path) from exc
        dtype = _dtype_names({name: t})[0][1]
        spool.entries.append(_Entry(name, dtype, list(t.shape), begin, begin + nbytes))
        self._names.add(name)

    def add_all(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, t in tensors:
            self.add(name, t)

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot for a checkpoint (flushes the spools to disk first)."""
        for s in self._spools:
            with (self.work / s.file).open("r+b") as f:
                os.fsync(f.fileno())
        return {
            "spools": [
                {
                    "file": s.file,
                    "entries": [[e.name, e.dtype, e.shape, e.begin, e.end] for e in s.entries],
                }
                for s in self._spools
            ]
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Return to a :meth:`state` snapshot: later bytes in the spools are cut off.

        Raises:
            PtqError: A spool is missing or shorter than recorded.
        """
        self._spools = []
        self._names = set()
        for s in state["spools"]:
            spool = _Spool(
                file=str(s["file"]),
                entries=[_Entry(n, d, list(sh), int(b), int(e)) for n, d, sh, b, e in s["entries"]],
            )
            path = self.work / spool.file
            if not path.is_file() or path.stat().st_size < spool.nbytes:
                raise PtqError(f"{path}: missing or cut short; rerun with --restart")
            with path.open("r+b") as f:
                f.truncate(spool.nbytes)
            self._spools.append(spool)
            self._names.update(e.name for e in spool.entries)
        for extra in self.work.glob("spool-*.bin"):
            if extra.name not in {s.file for s in self._spools}:
                extra.unlink()

    def needed_bytes(self, extra: int = 0) -> int:
        """Bytes the shards (plus ``extra`` bytes of other files) take on disk."""
        total = OVERHEAD + extra
        for s in self._spools:
            total += s.nbytes + sum(HEADER_PER_TENSOR + len(e.name.encode()) for e in s.entries)
        return total

    def finish(self, out: Path, *, extra_bytes: int = 0) -> list[str]:
        """Write the shards (and an index when there are several) into ``out``.

        Args:
            out: The (temporary, existing) output folder.
            extra_bytes: Bytes of other files the caller writes there (space check).

        Returns:
            The shard file names, in order.

        Raises:
            PtqError: Too little free space (checked first), or a write failed (the shard
                files written so far are removed).
        """
        spools = [s for s in self._spools if s.entries]
        if not spools:
            raise PtqError("no tensors to write: an exporter bug")
        needed = self.needed_bytes(extra_bytes)
        check_free_space(out, needed)
        names = _shard_names(len(spools))
        written: list[Path] = []
        try:
            for fname, spool in zip(names, spools, strict=True):
                by_name = {e.name: e for e in spool.entries}
                stand_ins = {e.name: _stand_in(e.dtype) for e in spool.entries}
                order = [by_name[n] for n, _ in _dtype_names(stand_ins)]
                written.append(out / fname)
                self.files.write_shard(
                    out / fname, _header_bytes(order), self.work / spool.file, order
                )
            if len(spools) > 1:
                weight_map = {
                    e.name: f for f, s in zip(names, spools, strict=True) for e in s.entries
                }
                index = {"metadata": {}, "weight_map": weight_map}
                written.append(out / INDEX_FILE)
                self.files.write_text(out / INDEX_FILE, json.dumps(index, indent=2))
        except OSError as exc:
            for path in written:
                path.unlink(missing_ok=True)
            where = written[-1].name if written else str(out)
            if exc.errno in _FULL_ERRNOS:
                raise PtqError(
                    f"{out}: the disk filled up while writing {where}; writing the output "
                    f"needs {_mb(needed)}, {_mb(free_bytes(out))} free; nothing was kept: "
                    "free some space or choose another output folder"
                ) from exc
            raise PtqError(
                f"{out}: writing {where} failed ({exc.strerror or exc}); nothing was kept"
            ) from exc
        return names

    def _disk_error(self, exc: OSError, path: Path) -> PtqError:
        if exc.errno in _FULL_ERRNOS:
            return PtqError(
                f"{path.parent}: the disk filled up while spooling the output "
                f"({_mb(free_bytes(path))} free); free some space, then rerun the same "
                "command to continue"
            )
        return PtqError(f"{path}: write failed ({exc.strerror or exc})")


_STAND_IN_DTYPES: Final = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _stand_in(dtype: str) -> torch.Tensor:
    """A one-element tensor of safetensors dtype ``dtype`` (for reading off the order)."""
    extra = {
        "U16": "uint16",
        "U32": "uint32",
        "U64": "uint64",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
        "F4": "float4_e2m1fn_x2",
    }
    if dtype in _STAND_IN_DTYPES:
        return torch.zeros(1, dtype=_STAND_IN_DTYPES[dtype])
    torch_dtype = getattr(torch, extra.get(dtype, ""), None)
    if not isinstance(torch_dtype, torch.dtype):
        raise PtqError(f"cannot write safetensors dtype {dtype}")
    return torch.zeros(1, dtype=torch_dtype)
