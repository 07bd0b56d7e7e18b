"""Lazy, validating safetensors reader: one file, or a checkpoint's shards.

The header of every file is parsed and validated first
(:mod:`ptq.io.safetensors_header`); a tensor's bytes are read only when asked for,
one tensor at a time, with ``seek`` + ``readinto`` straight into the tensor's storage,
so reading tensor ``t`` costs ``nbytes(t)`` of memory and nothing more (docs/invariants.md,
invariant 2: weights stream from shards). Sharded checkpoints follow the Hugging Face
layout: ``model.safetensors.index.json`` holds ``{"weight_map": {tensor: shard}}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ptq.errors import PtqInputError
from ptq.io.paths import safe_output_path
from ptq.io.safetensors_header import SafetensorsHeader, TensorEntry, read_header, torch_dtype_of

__all__ = ["INDEX_FILE", "SINGLE_FILE", "SafetensorsFile", "SafetensorsIndex"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FIX = "re-download or re-convert the checkpoint"


class SafetensorsFile:
    """One safetensors file whose header was validated on construction.

    Args:
        path: The ``.safetensors`` file.

    Raises:
        PtqInputError: If the file is missing or its header is malformed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.header: SafetensorsHeader = read_header(self.path)

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self)} tensors)"

    def __len__(self) -> int:
        return len(self.header.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.header.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.header.tensors)

    def keys(self) -> list[str]:
        """Tensor names in header order."""
        return list(self.header.tensors)

    @property
    def metadata(self) -> Mapping[str, str]:
        """The ``__metadata__`` object (empty if absent)."""
        return self.header.metadata

    def entry(self, name: str) -> TensorEntry:
        """The validated header entry of ``name``."""
        try:
            return self.header.tensors[name]
        except KeyError:
            raise PtqInputError(
                f"{self.path}: no tensor {name!r}; the checkpoint does not match the model: {_FIX}"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of the tensor that :meth:`get` returns (``F4``: last dim halved)."""
        return self.entry(name).torch_shape

    def dtype(self, name: str) -> torch.dtype:
        """Torch dtype of the tensor that :meth:`get` returns."""
        return torch_dtype_of(self.entry(name).dtype_name, self.path, name)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk into a new CPU tensor.

        Raises:
            PtqInputError: If the name is absent, the file shrank since its header was
                read, or a ``BOOL`` tensor holds bytes other than 0 and 1.
        """
        entry = self.entry(name)
        dtype = torch_dtype_of(entry.dtype_name, self.path, name)
        buf = torch.empty(entry.nbytes, dtype=torch.uint8)
        try:
            with self.path.open("rb") as f:
                f.seek(self.header.data_start + entry.begin)
                got = f.readinto(buf.numpy().data)
        except OSError as exc:
            raise PtqInputError(
                f"{self.path}, tensor {name!r}: read failed ({exc}); {_FIX}"
            ) from exc
        if got != entry.nbytes:
            raise PtqInputError(
                f"{self.path}, tensor {name!r}: file ends after {got} of {entry.nbytes} bytes "
                f"(truncated after it was opened); {_FIX}"
            )
        if dtype == torch.bool and entry.nbytes and int(buf.max()) > 1:
            raise PtqInputError(
                f"{self.path}, tensor {name!r}: BOOL tensor holds bytes other than 0/1; {_FIX}"
            )
        return buf.view(dtype).reshape(entry.torch_shape)


def _shard_path(model_dir: Path, shard: str, index: Path) -> Path:
    """Resolve a shard name from the index, refusing names that leave ``model_dir``."""
    try:
        return safe_output_path(model_dir, shard)
    except PtqInputError as exc:
        raise PtqInputError(f"{index}: shard name {shard!r} is unsafe ({exc}); {_FIX}") from None


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        obj = json.loads(index.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PtqInputError(f"{index}: not a readable JSON index ({exc}); {_FIX}") from exc
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise PtqInputError(f"{index}: 'weight_map' is not an object of tensor -> shard; {_FIX}")
    if not weight_map:
        raise PtqInputError(f"{index}: 'weight_map' is empty; {_FIX}")
    return weight_map


class SafetensorsIndex:
    """All tensors of a checkpoint directory, read lazily from their shards.

    The directory holds either ``model.safetensors.index.json`` (its ``weight_map`` is
    authoritative), or ``model.safetensors``, or any number of ``*.safetensors`` files.
    Every shard header is validated up front; every name in the index must be in its
    shard, and no tensor name may appear in two shards.

    Args:
        model_dir: The checkpoint directory.

    Raises:
        PtqInputError: If no shard is found, a shard is missing or corrupt, or the
            index and the shards disagree.
    """

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise PtqInputError(f"{self.model_dir}: not a directory; pass a checkpoint directory")
        index = self.model_dir / INDEX_FILE
        if index.exists():
            weight_map = _read_weight_map(index)
            names = sorted(set(weight_map.values()))
            paths = {s: _shard_path(self.model_dir, s, index) for s in names}
            for shard, path in paths.items():
                if not path.is_file():
                    raise PtqInputError(
                        f"{index}: shard {shard!r} is missing from {self.model_dir}; {_FIX}"
                    )
        elif (self.model_dir / SINGLE_FILE).is_file():
            paths = {SINGLE_FILE: self.model_dir / SINGLE_FILE}
            weight_map = {}
        else:
            found = sorted(p for p in self.model_dir.glob("*.safetensors") if p.is_file())
            if not found:
                raise PtqInputError(
                    f"{self.model_dir}: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors file; "
                    "pass a directory that holds safetensors weights"
                )
            paths = {p.name: p for p in found}
            weight_map = {}
        self._shards = {s: SafetensorsFile(p) for s, p in paths.items()}
        owner: dict[str, str] = {}
        for shard, file in self._shards.items():
            for name in file:
                if name in owner:
                    raise PtqInputError(
                        f"{self.model_dir}: tensor {name!r} is in both {owner[name]!r} and "
                        f"{shard!r}; {_FIX}"
                    )
                owner[name] = shard
        for name, shard in weight_map.items():
            if name not in self._shards[shard]:
                raise PtqInputError(
                    f"{self._shards[shard].path}: tensor {name!r}, listed in {INDEX_FILE}, "
                    f"is not in this shard; {_FIX}"
                )
        self._owner: dict[str, str] = weight_map if index.exists() else owner

    def __repr__(self) -> str:
        return f"SafetensorsIndex({str(self.model_dir)!r}, {len(self)} tensors)"

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, name: object) -> bool:
        return name in self._owner

    def __iter__(self) -> Iterator[str]:
        return iter(self._owner)

    def keys(self) -> list[str]:
        """All tensor names (index order, or shard-by-shard header order)."""
        return list(self._owner)

    def file_of(self, name: str) -> SafetensorsFile:
        """The shard holding ``name``."""
        shard = self._owner.get(name)
        if shard is None:
            raise PtqInputError(
                f"{self.model_dir}: no tensor {name!r} in the checkpoint; the checkpoint "
                f"does not match the model: {_FIX}"
            )
        return self._shards[shard]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from its shard."""
        return self.file_of(name).get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of the tensor that :meth:`get` returns."""
        return self.file_of(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """Torch dtype of the tensor that :meth:`get` returns."""
        return self.file_of(name).dtype(name)

    def names_with_prefix(self, prefix: str) -> list[str]:
        """Names that start with ``prefix`` (e.g. ``"model.layers.3."``), in order."""
        return [n for n in self._owner if n.startswith(prefix)]
