"""``--allow-pickle``: convert a pickle-only model folder into a cached safetensors folder.

A Hugging Face folder whose weights are only ``pytorch_model.bin`` (or shards listed in
``pytorch_model.bin.index.json``) is refused by default (:mod:`ptq.models.source`). With
the user's explicit opt-in, each file is read with
:func:`ptq.io.checks.refuse_pickle` (``torch.load(weights_only=True)``: only tensors and
plain containers are unpickled, so no code in the file runs — a ``__reduce__`` that
calls ``os.system`` is refused) and written as safetensors into a cache folder, so the
rest of the pipeline stays safetensors-only (docs/invariants.md, invariant 4). The cache folder
is keyed by the source path and each pickle file's name, size and modification time,
and is written atomically (:func:`ptq.output.atomic_output_dir`).

Config, tokenizer and code files are copied alongside; code files are never imported
here, and run later only under ``--trust-remote-code``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Final

import torch
from safetensors.torch import save_file

from ptq.errors import PtqInputError
from ptq.io.checks import PICKLE_SUFFIXES, refuse_pickle
from ptq.io.paths import safe_output_path
from ptq.models.paths import cache_dir
from ptq.output import atomic_output_dir

__all__ = ["PICKLE_INDEX", "PICKLE_SINGLE", "convert_pickle_folder", "pickle_files"]

PICKLE_INDEX: Final = "pytorch_model.bin.index.json"
PICKLE_SINGLE: Final = "pytorch_model.bin"
_COPY_SUFFIXES: Final = (".json", ".txt", ".model", ".jinja", ".py", ".tiktoken")


def pickle_files(path: Path) -> list[Path]:
    """The pickle weight files of model folder ``path``, in shard order.

    ``pytorch_model.bin.index.json`` (its ``weight_map`` shards), else
    ``pytorch_model.bin``, else the folder's single ``.bin/.pt/.pth/.ckpt`` file.

    Raises:
        PtqInputError: No pickle weights, an unreadable index, or several candidates.
    """
    index = path / PICKLE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({str(v) for v in weight_map.values()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PtqInputError(f"{index}: no readable weight_map ({exc})") from None
        files = [safe_output_path(path, s) for s in shards]
        for f in files:
            if not f.is_file():
                raise PtqInputError(f"{index}: shard {f.name} is missing from {path}")
        return files
    if (path / PICKLE_SINGLE).is_file():
        return [path / PICKLE_SINGLE]
    found = sorted(p for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if len(found) == 1:
        return found
    if not found:
        raise PtqInputError(f"{path}: no pickle weights ({PICKLE_SINGLE} or {PICKLE_INDEX})")
    raise PtqInputError(
        f"{path}: several pickle files ({', '.join(p.name for p in found)}) and no "
        f"{PICKLE_INDEX} saying which are the weights; add the index or keep one file"
    )


def _cache_key(path: Path, files: list[Path]) -> str:
    digest = hashlib.sha256(str(path.resolve()).encode())
    for f in files:
        st = f.stat()
        digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Own, contiguous CPU copies: safetensors refuses tensors that share storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _convert(files: list[Path], src: Path, out: Path) -> None:
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    )
    weight_map: dict[str, str] = {}
    for file, name in zip(files, names, strict=True):
        state = _plain(refuse_pickle(file, allow_pickle=True))
        for key in state:
            if key in weight_map:
                raise PtqInputError(f"{src}: tensor {key!r} is in two pickle shards")
            weight_map[key] = name
        save_file(state, str(out / name), metadata={"format": "pt"})
        del state
    if len(files) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix in _COPY_SUFFIXES and f.name != PICKLE_INDEX:
            shutil.copy2(f, out / f.name)


def convert_pickle_folder(path: Path, *, cache: Path | None = None) -> Path:
    """Convert pickle-only model folder ``path`` to safetensors; return the converted folder.

    Args:
        path: A Hugging Face folder with ``config.json`` and pickle weights.
        cache: Parent folder of the converted copies (default ``<ptq cache>/models/pickle``).

    Returns:
        ``<cache>/<name>-<key>``, reused while the pickle files are unchanged.

    Raises:
        PtqInputError: No weights, or a file that ``torch.load(weights_only=True)``
            refuses (it would run code, or is not a plain name -> tensor dict).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise PtqInputError(f"{path} is not a model folder: config.json is missing")
    files = pickle_files(path)
    root = cache if cache is not None else cache_dir() / "models" / "pickle"
    out = root / f"{path.resolve().name}-{_cache_key(path, files)}"
    if (out / "config.json").is_file():
        return out
    with atomic_output_dir(out, overwrite=out.exists()) as tmp:
        _convert(files, path, tmp)
    return out
