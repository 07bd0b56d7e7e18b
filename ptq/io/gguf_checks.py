"""Validate a GGUF file before handing it to transformers (which uses ``gguf``).

GGUF layout (ggml-org/ggml, docs/gguf.md), all integers little-endian (or all
big-endian, told apart by the version's low 16 bits being zero when misread)::

    magic "GGUF" | version u32 (2 or 3) | tensor_count u64 | kv_count u64
    kv_count x   (key: string, type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims: u64[n_dims], type: u32, offset: u64)
    padding to general.alignment (default 32) | tensor data

with ``string = (len: u64, bytes)`` and ``array = (elem_type: u32, count: u64, elems)``.
A first pass walks this structure with every length checked against the bytes left,
so a hostile count can neither allocate nor loop past the end of the file; it also
checks each tensor's bytes, ``n_elems / block_size * type_size``, lie inside the file.
Then ``gguf.GGUFReader`` parses the file, its exceptions turned into
:class:`ptq.errors.PtqInputError` naming the file.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ptq.errors import PtqInputError

__all__ = ["GGUFSummary", "check_gguf_file"]

_SCALAR_BYTES: Final = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DEPTH: Final = 4
_MAX_DIMS: Final = 4
_DEFAULT_ALIGNMENT: Final = 32
_FIX: Final = "the file is truncated or corrupt: re-download or re-convert the GGUF"


@dataclass(frozen=True)
class GGUFSummary:
    """What the structural check learned about a GGUF file."""

    version: int
    tensor_count: int
    kv_count: int
    architecture: str
    alignment: int
    data_start: int


class _Cursor:
    """Bounds-checked reader over the file's bytes."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.endian = buf, path, 0, "<"

    def fail(self, what: str) -> PtqInputError:
        return PtqInputError(f"{self.path}: {what} (at byte {self.pos}); {_FIX}")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.left():
            raise self.fail(f"file ends inside {what}: needs {n} bytes, {self.left()} left")
        start, self.pos = self.pos, self.pos + n
        return start

    def uint(self, fmt: str, what: str) -> int:
        start = self.take(struct.calcsize(fmt), what)
        return int(struct.unpack_from(self.endian + fmt, self.buf, start)[0])

    def string(self, what: str) -> str:
        n = self.uint("Q", what)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def skip_value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[vtype], what)
        elif vtype == _STRING:
            self.take(self.uint("Q", what), what)
        elif vtype == _ARRAY and depth < _MAX_DEPTH:
            etype, count = self.uint("I", what), self.uint("Q", what)
            if etype in _SCALAR_BYTES:
                self.take(count * _SCALAR_BYTES[etype], what)
                return
            if count * (8 if etype == _STRING else 12) > self.left():
                raise self.fail(
                    f"file ends inside {what}: it claims {count} elements, {self.left()} bytes left"
                )
            for _ in range(count):
                self.skip_value(etype, what, depth + 1)
        else:
            raise self.fail(f"{what} has unknown or too deeply nested value type {vtype}")


def _header(c: _Cursor) -> tuple[int, int, int]:
    if c.left() < 24 or bytes(c.buf[:4]) != b"GGUF":
        raise c.fail(f"no GGUF magic: starts with {bytes(c.buf[:4])!r}, not b'GGUF'")
    c.pos = 4
    version = c.uint("I", "version")
    if version & 0xFFFF == 0:
        c.endian = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        raise c.fail(f"GGUF version {version} is not supported (only 2 and 3); re-convert it")
    n_tensors, n_kv = c.uint("Q", "tensor count"), c.uint("Q", "kv count")
    if n_kv * 13 + n_tensors * 24 > c.left():
        raise c.fail(
            f"{n_tensors} tensors and {n_kv} keys cannot fit in {len(c.buf)} bytes (truncated?)"
        )
    return version, n_tensors, n_kv


def _metadata(c: _Cursor, n_kv: int) -> tuple[str, int]:
    seen: set[str] = set()
    arch, alignment = None, _DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = c.string(f"key #{i}")
        if key in seen:
            raise c.fail(f"metadata key {key!r} appears twice")
        seen.add(key)
        vtype = c.uint("I", f"type of {key!r}")
        if key == "general.architecture":
            if vtype != _STRING:
                raise c.fail(f"general.architecture has type {vtype}, not string")
            arch = c.string(key)
        elif key == "general.alignment":
            if vtype != _UINT32:
                raise c.fail(f"general.alignment has type {vtype}, not uint32")
            alignment = c.uint("I", key)
            if alignment == 0 or alignment & (alignment - 1):
                raise c.fail(f"general.alignment {alignment} is not a power of two")
        else:
            c.skip_value(vtype, f"value of {key!r}")
    if not arch:
        raise c.fail("metadata has no general.architecture key")
    return arch, alignment


def _tensors(c: _Cursor, n_tensors: int) -> list[tuple[str, int, int]]:
    out, seen = [], set()
    for i in range(n_tensors):
        name = c.string(f"name of tensor #{i}")
        if name in seen:
            raise c.fail(f"tensor {name!r} appears twice")
        seen.add(name)
        n_dims = c.uint("I", f"n_dims of {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dims, not 1..{_MAX_DIMS}")
        dims = [c.uint("Q", f"dims of {name!r}") for _ in range(n_dims)]
        raw_type = c.uint("I", f"type of {name!r}")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise c.fail(f"tensor {name!r} has unknown ggml type {raw_type}") from None
        if dims[0] % block:
            raise c.fail(f"tensor {name!r} row of {dims[0]} is not a multiple of block {block}")
        n_elems = 1
        for d in dims:
            n_elems *= d
        offset = c.uint("Q", f"offset of {name!r}")
        out.append((name, offset, n_elems // block * type_size))
    return out


def _check_data(c: _Cursor, tensors: list[tuple[str, int, int]], alignment: int) -> int:
    start = -(-c.pos // alignment) * alignment
    prev_end, prev_name = 0, ""
    for name, offset, nbytes in sorted(tensors, key=lambda t: (t[1], t[2])):
        if offset % alignment:
            raise c.fail(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
        if offset < prev_end:
            raise c.fail(f"tensor {name!r} bytes overlap tensor {prev_name!r}")
        if start + offset + nbytes > len(c.buf):
            raise c.fail(
                f"tensor {name!r} needs bytes up to {start + offset + nbytes} but the file "
                f"is {len(c.buf)} bytes"
            )
        prev_end, prev_name = offset + nbytes, name
    return start


def check_gguf_file(path: str | os.PathLike[str], *, deep: bool = True) -> GGUFSummary:
    """Validate a GGUF file's header, metadata, tensor table and data extent.

    Args:
        path: The ``.gguf`` file.
        deep: Also parse it with ``gguf.GGUFReader`` (as transformers will; seconds on
            a 100 MB file), converting its exceptions.

    Returns:
        A summary of the header.

    Raises:
        PtqInputError: Naming the file and what is wrong.
    """
    p = Path(path)
    if not p.is_file():
        raise PtqInputError(f"{p}: not a file; check the path to the .gguf file")
    if p.stat().st_size < 24:
        raise PtqInputError(f"{p}: {p.stat().st_size} bytes is too short for a GGUF header; {_FIX}")
    with p.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf, p)
        version, n_tensors, n_kv = _header(c)
        arch, alignment = _metadata(c, n_kv)
        data_start = _check_data(c, _tensors(c, n_tensors), alignment)
    if deep:
        try:
            GGUFReader(p)
        except Exception as exc:  # the reader raises ValueError, KeyError, IndexError, ...
            raise PtqInputError(
                f"{p}: gguf.GGUFReader failed ({type(exc).__name__}: {str(exc)[:200]}); {_FIX}"
            ) from exc
    return GGUFSummary(version, n_tensors, n_kv, arch, alignment, data_start)
