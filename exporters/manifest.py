"""Integrity manifest of an output folder: ``ptq_manifest.json``.

Written last, inside the temporary output folder (before it is renamed into place), it
lists every file with its size and SHA-256 (FIPS 180-4) and every tensor of every
safetensors file with its name, safetensors dtype, on-disk shape and file. ``ptq
verify`` recomputes all of it, so a flipped byte, a truncated or deleted shard, or a
file added afterwards is found and named.

Layout::

    {"version": 1,
     "files":   {"model.safetensors": {"size": 123, "sha256": "ab.."}, ...},
     "tensors": {"model.layers.0.mlp.down_proj.weight_packed":
                     {"dtype": "I32", "shape": [64, 24], "file": "model.safetensors"}, ...}}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Final

import torch

from ptq.errors import PtqError, PtqInputError
from ptq.io.safetensors_reader import SafetensorsFile

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_VERSION",
    "build_manifest",
    "check_tensor",
    "read_manifest",
    "sha256_file",
    "write_manifest",
]

MANIFEST_FILE: Final = "ptq_manifest.json"
MANIFEST_VERSION: Final = 1
_CHUNK: Final = 1 << 20


def check_tensor(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor that must never be written: on the meta device, or empty.

    Raises:
        PtqError: Naming the tensor.
    """
    if t.device.type == "meta":
        raise PtqError(f"refusing to write {name}: it is on the meta device (never loaded)")
    if t.numel() == 0:
        raise PtqError(
            f"refusing to write {name}: it is empty (shape {list(t.shape)}); "
            "an export bug or a model with a zero-sized layer"
        )


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (bounded memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            raise PtqError(f"{p}: output folders hold plain files only, found a link")
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE:
            out.append(p)
    return out


def build_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder`` as a JSON-ready dict (see the module docstring)."""
    files: dict[str, dict[str, Any]] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for path in _files(folder):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        if path.suffix == ".safetensors":
            st = SafetensorsFile(path)
            for name in st:
                entry = st.entry(name)
                if name in tensors:
                    raise PtqError(
                        f"{folder}: tensor {name!r} is in both {tensors[name]['file']} and {rel}"
                    )
                tensors[name] = {"dtype": entry.dtype_name, "shape": list(entry.shape), "file": rel}
    return {"version": MANIFEST_VERSION, "files": files, "tensors": tensors}


def write_manifest(folder: Path) -> None:
    """Write ``folder/ptq_manifest.json``; call it after every other file is written."""
    text = json.dumps(build_manifest(folder), indent=1, sort_keys=True)
    (folder / MANIFEST_FILE).write_text(text + "\n")


def _bad(path: Path, what: str) -> PtqInputError:
    return PtqInputError(f"{path}: {what}; the manifest is corrupt: re-export the model")


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read and structurally validate ``folder/ptq_manifest.json``.

    Raises:
        PtqInputError: The manifest is missing, not JSON, or malformed (names the key).
    """
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise PtqInputError(
            f"{folder}: no {MANIFEST_FILE}; it was not written by this ptq or was "
            "removed: re-export the model"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise _bad(path, f"expected an object with version {MANIFEST_VERSION}")
    files, tensors = data.get("files"), data.get("tensors")
    if not isinstance(files, dict) or not isinstance(tensors, dict):
        raise _bad(path, "'files' and 'tensors' must be objects")
    for rel, info in files.items():
        if not (
            isinstance(info, dict)
            and isinstance(info.get("size"), int)
            and isinstance(info.get("sha256"), str)
        ):
            raise _bad(path, f"entry for file {rel!r} lacks an integer size or a sha256")
    for name, info in tensors.items():
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and isinstance(info.get("file"), str)
        ):
            raise _bad(path, f"entry for tensor {name!r} lacks dtype, shape or file")
    return data
