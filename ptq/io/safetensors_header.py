"""Parse and validate a safetensors header before any tensor byte is read.

Layout of a safetensors file (huggingface/safetensors, "Format" section)::

    [ N: u64 little-endian ][ N bytes of UTF-8 JSON ][ data buffer of D bytes ]

The JSON object maps each tensor name to ``{"dtype", "shape", "data_offsets"}``, with
``data_offsets = [begin, end]`` relative to the start of the data buffer, plus an
optional ``"__metadata__"`` object of string to string (or ``null``). A header is
accepted only if

* ``0 < N <= min(file_size - 8, 100 MB)``,
* every entry has a known dtype, a shape of non-negative ints and
  ``0 <= begin <= end <= D`` with ``end - begin = prod(shape) * bits(dtype) / 8``,
* the byte ranges, sorted by ``begin``, do not overlap: ``begin_{i+1} >= end_i``.

Every failure raises :class:`ptq.errors.PtqInputError` naming the file and tensor.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

import torch

from ptq.errors import PtqInputError

__all__ = [
    "MAX_HEADER_BYTES",
    "SAFETENSORS_DTYPES",
    "SafetensorsHeader",
    "TensorEntry",
    "parse_header_bytes",
    "read_header",
    "torch_dtype_of",
]

MAX_HEADER_BYTES: Final = 100 * 1000 * 1000
"""Largest JSON header accepted (the reference implementation's limit)."""

SAFETENSORS_DTYPES: Final[Mapping[str, tuple[str | None, int]]] = MappingProxyType(
    {
        "F64": ("float64", 64),
        "F32": ("float32", 32),
        "F16": ("float16", 16),
        "BF16": ("bfloat16", 16),
        "C64": ("complex64", 64),
        "I64": ("int64", 64),
        "I32": ("int32", 32),
        "I16": ("int16", 16),
        "I8": ("int8", 8),
        "U64": ("uint64", 64),
        "U32": ("uint32", 32),
        "U16": ("uint16", 16),
        "U8": ("uint8", 8),
        "BOOL": ("bool", 8),
        "F8_E4M3": ("float8_e4m3fn", 8),
        "F8_E4M3FNUZ": ("float8_e4m3fnuz", 8),
        "F8_E5M2": ("float8_e5m2", 8),
        "F8_E5M2FNUZ": ("float8_e5m2fnuz", 8),
        "F8_E8M0": ("float8_e8m0fnu", 8),
        "F4": ("float4_e2m1fn_x2", 4),
        "F6_E2M3": (None, 6),
        "F6_E3M2": (None, 6),
    }
)
"""safetensors dtype name -> (torch dtype attribute or None if torch has none, bits)."""

_FIX: Final = "the file is corrupt or not safetensors: re-download or re-convert the checkpoint"


def _error(path: str | os.PathLike[str], what: str, tensor: str | None = None) -> PtqInputError:
    where = os.fspath(path) if tensor is None else f"{os.fspath(path)}, tensor {_short(tensor)}"
    return PtqInputError(f"{where}: {what}; {_FIX}")


@dataclass(frozen=True)
class TensorEntry:
    """One validated header entry.

    Attributes:
        name: Tensor name.
        dtype_name: safetensors dtype name, e.g. ``"BF16"``.
        shape: Shape as written in the file (``F4`` counts 4-bit elements).
        begin: First byte, relative to the data buffer.
        end: One past the last byte, relative to the data buffer.
    """

    name: str
    dtype_name: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's bytes in the file."""
        return self.end - self.begin

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """Shape of the torch tensor: ``F4`` packs two elements per ``float4_e2m1fn_x2``."""
        if self.dtype_name == "F4":
            return (*self.shape[:-1], self.shape[-1] // 2)
        return self.shape


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: where the data buffer starts and what it holds."""

    data_start: int
    data_size: int
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]


def torch_dtype_of(dtype_name: str, path: str | os.PathLike[str], tensor: str) -> torch.dtype:
    """Map a validated safetensors dtype name to the torch dtype that holds it."""
    attr, _ = SAFETENSORS_DTYPES[dtype_name]
    dtype = getattr(torch, attr, None) if attr is not None else None
    if not isinstance(dtype, torch.dtype):
        raise PtqInputError(
            f"{os.fspath(path)}, tensor {tensor!r}: dtype {dtype_name} has no torch dtype in "
            f"torch {torch.__version__}; convert the checkpoint to a supported dtype"
        )
    return dtype


def _short(x: object, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(path: str | os.PathLike[str], name: str, raw: object, data_size: int) -> TensorEntry:
    if not isinstance(raw, dict):
        raise _error(path, f"entry {_short(raw)} is not a JSON object", name)
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in raw]
    if missing:
        raise _error(path, f"entry lacks {', '.join(missing)}", name)
    dtype_name, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        known = ", ".join(SAFETENSORS_DTYPES)
        raise _error(path, f"unknown dtype {_short(dtype_name)} (known: {known})", name)
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _error(path, f"shape {_short(shape)} is not a list of non-negative integers", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise _error(path, f"data_offsets {_short(offsets)} is not a list of two integers", name)
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise _error(
            path,
            f"data_offsets [{begin}, {end}] lie outside the {data_size}-byte data buffer",
            name,
        )
    bits = SAFETENSORS_DTYPES[dtype_name][1]
    total_bits = math.prod(shape) * bits
    if total_bits % 8 != 0 or (dtype_name == "F4" and (not shape or shape[-1] % 2 != 0)):
        raise _error(path, f"shape {_short(shape)} does not fill whole bytes of {dtype_name}", name)
    if end - begin != total_bits // 8:
        raise _error(
            path,
            f"holds {end - begin} bytes but shape {_short(shape)} of {dtype_name} "
            f"needs {total_bits // 8}",
            name,
        )
    return TensorEntry(name, dtype_name, tuple(shape), begin, end)


def _metadata(path: str | os.PathLike[str], raw: object) -> dict[str, str]:
    if raw is None:  # the reference reader accepts ``null`` as "no metadata"
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise _error(path, "__metadata__ is not an object of string to string")
    return raw


def parse_header_bytes(
    raw: bytes, data_start: int, data_size: int, path: str | os.PathLike[str]
) -> SafetensorsHeader:
    """Validate the JSON header bytes of a safetensors file.

    Args:
        raw: The ``N`` header bytes (UTF-8 JSON).
        data_start: Absolute file offset of the data buffer (``8 + N``).
        data_size: Size of the data buffer in bytes (``file_size - 8 - N``).
        path: The file, named in error messages.

    Returns:
        The validated header.

    Raises:
        PtqInputError: On any malformed, inconsistent or overlapping entry.
    """
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_unique_object)
    except UnicodeDecodeError as exc:
        raise _error(path, f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except (ValueError, RecursionError) as exc:
        raise _error(path, f"header is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise _error(path, f"header is a JSON {type(obj).__name__}, not an object")
    metadata = _metadata(path, obj.pop("__metadata__", {}))
    entries = {name: _entry(path, name, value, data_size) for name, value in obj.items()}
    ordered = sorted(entries.values(), key=lambda e: (e.begin, e.end))
    for prev, cur in itertools.pairwise(ordered):
        if cur.begin < prev.end:
            raise _error(
                path,
                f"bytes [{cur.begin}, {cur.end}] overlap tensor {prev.name!r} "
                f"[{prev.begin}, {prev.end}]",
                cur.name,
            )
    return SafetensorsHeader(
        data_start, data_size, MappingProxyType(entries), MappingProxyType(metadata)
    )


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Only ``8 + N`` bytes are read; the data buffer is not touched.

    Raises:
        PtqInputError: If the file is missing, not a regular file or malformed.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PtqInputError(
            f"{os.fspath(path)}: cannot open ({exc.strerror}); check the path"
        ) from exc
    if not stat.S_ISREG(st.st_mode):
        raise PtqInputError(f"{os.fspath(path)}: not a regular file; pass a .safetensors file")
    size = st.st_size
    if size < 8:
        raise _error(path, f"file is {size} bytes, shorter than the 8-byte header length")
    with Path(path).open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n == 0 or n > size - 8 or n > MAX_HEADER_BYTES:
            raise _error(
                path,
                f"header length {n} is not in [1, min({size - 8}, {MAX_HEADER_BYTES})] "
                f"(file is {size} bytes; truncated?)",
            )
        raw = f.read(n)
    if len(raw) != n:
        raise _error(path, "file shrank while its header was read")
    return parse_header_bytes(raw, 8 + n, size - 8 - n, path)
