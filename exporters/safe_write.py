"""Writing shards without leaving half-written state when the disk fills up.

Before anything is written, the output size is estimated as

    needed = sum_t nbytes(t) + sum_t (HEADER_PER_TENSOR + len(name_t)) + OVERHEAD + extra

(tensor bytes, the JSON headers of the safetensors files, small JSON files, and
``extra`` for files the caller copies, e.g. the tokenizer) and compared with the free
space of the target filesystem (``shutil.disk_usage``); a shortfall is refused before the
first byte with "needs X MB, Y MB free". If the disk still fills up (ENOSPC, or EDQUOT
for a quota) while writing, every file this call wrote is removed and a
:class:`~ptq.errors.PtqError` carries the same figures; the caller's atomic output
folder (:func:`ptq.output.atomic_output_dir`) then drops the temporary folder, so the
previous output is untouched. :func:`write_shards` is a drop-in for
``ptq.exporters.safetensors_export.write_shards``.

Writes go through :class:`ShardWriter` so tests can inject faults (replace ``save``).
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import torch
from safetensors.torch import save_file

from ptq.errors import PtqError
from ptq.exporters.manifest import check_tensor

__all__ = [
    "MAX_SHARD_BYTES",
    "ShardWriter",
    "check_free_space",
    "estimate_bytes",
    "free_bytes",
    "write_shards",
]

MAX_SHARD_BYTES: Final = 2 * 1024**3
HEADER_PER_TENSOR: Final = 96
OVERHEAD: Final = 1 << 20
_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
INDEX_FILE: Final = "model.safetensors.index.json"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class ShardWriter:
    """Writes one safetensors file; the single point where shard bytes hit the disk."""

    def save(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        """Write ``tensors`` to ``path`` (safetensors, metadata ``format: pt``)."""
        save_file(tensors, str(path), metadata={"format": "pt"})

    def write_text(self, path: Path, text: str) -> None:
        """Write a small text file (the shard index)."""
        path.write_text(text)


def free_bytes(target: Path) -> int:
    """Free bytes on the filesystem that holds ``target`` (or its nearest existing parent)."""
    probe = target.resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def estimate_bytes(tensors: Iterable[tuple[str, torch.Tensor]], extra: int = 0) -> int:
    """Bytes the shards (plus ``extra`` bytes of other files) will take on disk."""
    total = OVERHEAD + extra
    for name, t in tensors:
        total += t.numel() * t.element_size() + HEADER_PER_TENSOR + len(name.encode())
    return total


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


def _plan_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors:
        check_tensor(name, t)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    return shards


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_shards(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out: Path,
    *,
    extra_bytes: int = 0,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    writer: ShardWriter | None = None,
) -> list[str]:
    """Write tensors into shards of at most ``max_shard_bytes`` plus an index when several.

    Args:
        tensors: ``(name, tensor)`` pairs; meta and empty tensors are refused.
        out: The (temporary, existing) output folder.
        extra_bytes: Bytes of other files the caller will write (counted in the check).
        max_shard_bytes: Shard size limit (2 GiB, as Hugging Face).
        writer: Where bytes go (tests replace ``ShardWriter.save`` to inject faults).

    Returns:
        The shard file names, in order.

    Raises:
        PtqError: Too little free space (before writing), or the disk filled up or a
            write failed while writing (the files written so far are removed).
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    writer = writer or ShardWriter()
    shards = _plan_shards(tensors, max_shard_bytes)
    needed = estimate_bytes(((n, t) for s in shards for n, t in s.items()), extra_bytes)
    check_free_space(out, needed)
    names = _shard_names(len(shards))
    written: list[Path] = []
    try:
        for fname, shard in zip(names, shards, strict=True):
            written.append(out / fname)
            writer.save(shard, out / fname)
        if len(shards) > 1:
            weight_map = {n: f for f, s in zip(names, shards, strict=True) for n in s}
            index = {"metadata": {}, "weight_map": weight_map}
            written.append(out / INDEX_FILE)
            writer.write_text(out / INDEX_FILE, json.dumps(index, indent=2))
    except OSError as exc:
        for path in written:
            path.unlink(missing_ok=True)
        where = written[-1].name if written else str(out)
        if exc.errno in _FULL_ERRNOS:
            raise PtqError(
                f"{out}: the disk filled up while writing {where}; writing the output needs "
                f"{_mb(needed)}, {_mb(free_bytes(out))} free; nothing was kept: free some "
                "space or choose another output folder"
            ) from exc
        raise PtqError(
            f"{out}: writing {where} failed ({exc.strerror or exc}); nothing was kept"
        ) from exc
    return names
