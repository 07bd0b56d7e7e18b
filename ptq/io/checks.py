"""Input checks run before quantizing: config vs weights, finite weights, no pickle.

Each check raises :class:`ptq.errors.PtqInputError` with one message naming the file
or tensor and the fix (docs/invariants.md, invariants 4 and 6).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import torch

from ptq.errors import PtqInputError
from ptq.io.paths import safe_output_path
from ptq.io.safetensors_reader import SafetensorsIndex

__all__ = [
    "PICKLE_SUFFIXES",
    "check_config_matches_weights",
    "check_finite_weights",
    "refuse_pickle",
    "safe_output_path",
]

PICKLE_SUFFIXES: Final = frozenset({".bin", ".pt", ".pth", ".ckpt"})
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_CHUNK: Final = 1 << 22


def _config_int(config: Mapping[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PtqInputError(
            f"config.json: {key} = {value!r} is not a positive integer; fix config.json"
        )
    return value


def _find_one(index: SafetensorsIndex, suffix: str) -> str | None:
    hits = [n for n in index if n == suffix or n.endswith("." + suffix)]
    return min(hits, key=len) if hits else None


def check_config_matches_weights(config: Mapping[str, Any], index: SafetensorsIndex) -> None:
    """Check a Llama-like ``config.json`` against the checkpoint's tensors.

    Checks: ``embed_tokens.weight`` has shape ``[vocab_size, hidden_size]``; the
    decoder blocks present are exactly ``layers.0 .. layers.{num_hidden_layers-1}``;
    ``lm_head.weight`` (required unless ``tie_word_embeddings``) has shape
    ``[vocab_size, hidden_size]``; every ``q_proj.weight`` has ``hidden_size`` inputs.

    Raises:
        PtqInputError: Naming the config key and the tensor that disagree.
    """
    hidden = _config_int(config, "hidden_size")
    n_layers = _config_int(config, "num_hidden_layers")
    vocab = _config_int(config, "vocab_size")
    fix = "the config.json does not belong to these weights: use the checkpoint's own config"
    where = index.model_dir
    embed = _find_one(index, "embed_tokens.weight")
    if embed is None:
        raise PtqInputError(f"{where}: no embed_tokens.weight tensor; not a Llama-like checkpoint")
    heads = [embed]
    head = _find_one(index, "lm_head.weight")
    if head is not None:
        heads.append(head)
    elif not config.get("tie_word_embeddings", False):
        raise PtqInputError(
            f"{where}: no lm_head.weight but config.json has tie_word_embeddings false; "
            "set it true if the head is tied, or use the complete checkpoint"
        )
    for name in heads:
        shape = index.shape(name)
        if shape != (vocab, hidden):
            raise PtqInputError(
                f"{where}, tensor {name!r}: shape {list(shape)} but config.json says "
                f"[vocab_size={vocab}, hidden_size={hidden}]; {fix}"
            )
    present = {int(m.group(1)) for n in index if (m := _LAYER.search(n))}
    missing = sorted(set(range(n_layers)) - present)
    extra = sorted(present - set(range(n_layers)))
    if missing or extra:
        raise PtqInputError(
            f"{where}: config.json num_hidden_layers={n_layers} but layers "
            f"{missing[:8]} are missing and {extra[:8]} are extra; {fix}"
        )
    for name in index:
        if name.endswith("q_proj.weight"):
            shape = index.shape(name)
            if len(shape) != 2 or shape[1] != hidden:
                raise PtqInputError(
                    f"{where}, tensor {name!r}: shape {list(shape)} but config.json "
                    f"hidden_size={hidden}; {fix}"
                )


def check_finite_weights(name: str, tensor: torch.Tensor) -> None:
    """Refuse a floating-point tensor holding NaN or ±Inf.

    The tensor is scanned in chunks of ``2^22`` elements upcast to float32, so the
    extra memory is bounded (16 MiB) whatever the tensor's size and dtype.

    Raises:
        PtqInputError: Naming the tensor and its NaN and Inf counts.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    flat = tensor.detach().reshape(-1)
    n_nan = n_inf = 0
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        chunk = chunk if chunk.is_complex() else chunk.to(torch.float32)
        n_nan += int(torch.isnan(chunk).sum())
        n_inf += int(torch.isinf(chunk).sum())
    if n_nan or n_inf:
        raise PtqInputError(
            f"tensor {name!r}: {n_nan} NaN and {n_inf} Inf of {flat.numel()} values; the "
            "checkpoint is corrupt or was saved after a diverged step: use a healthy checkpoint"
        )


def refuse_pickle(path: str | os.PathLike[str], allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Load a pickle checkpoint (``.bin .pt .pth .ckpt``) only when the user allows it.

    Even when allowed, ``torch.load(weights_only=True)`` restricts unpickling to
    tensors and plain containers, so no code in the file runs (docs/invariants.md, invariant 4).

    Args:
        path: The checkpoint file.
        allow_pickle: The user's explicit opt-in (``--allow-pickle``).

    Returns:
        The state dict (a top-level ``{"state_dict": {...}}`` is unwrapped).

    Raises:
        PtqInputError: If pickle is not allowed, the suffix is not a pickle one, or
            the file is not a plain ``str -> Tensor`` state dict.
    """
    p = Path(path)
    if p.suffix.lower() not in PICKLE_SUFFIXES:
        raise PtqInputError(
            f"{p}: not a pickle checkpoint ({', '.join(sorted(PICKLE_SUFFIXES))}); "
            "pass a .safetensors file or directory"
        )
    if not allow_pickle:
        raise PtqInputError(
            f"{p}: pickle checkpoints can run code when loaded and are refused; convert it to "
            "safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (
        OSError,
        EOFError,
        RuntimeError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        AttributeError,
        ImportError,
        KeyError,
        TypeError,
    ) as exc:
        raise PtqInputError(
            f"{p}: torch.load(weights_only=True) refused it ({type(exc).__name__}: "
            f"{str(exc)[:200]}); convert the checkpoint to safetensors"
        ) from exc
    if isinstance(obj, dict) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise PtqInputError(
            f"{p}: holds a {type(obj).__name__}, not a dict of name -> tensor; "
            "save model.state_dict() or convert it to safetensors"
        )
    return obj
