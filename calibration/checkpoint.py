"""Resumable runs: the work folder's state after each finished block.

A run that writes an output keeps a work folder ``.OUT.work`` beside it. After a block
is finished the runner may checkpoint: the activation streams entering the next block
(``streams-NNNNN/``, one safetensors file per batch, written one at a time so a
checkpoint costs one batch of extra memory), then the writer's spool table, the records
so far and the next block's index (``state.json``, replaced atomically), and only then
the previous checkpoint's streams are deleted: the state never names a half-written
file. Rerunning the same command finds the state and
continues after the last checkpointed block; the work done since is redone, with the
same result, so the output is byte-identical to an uninterrupted run. A state written
by a different command (its fingerprint: the model, plan, pipeline, calibration data,
seed) is refused unless ``restart`` is set.

Checkpoints cost a write of the streams. They are taken after a block when at least
``interval_s`` seconds have passed since the last one, and never more than one block
apart when ``interval_s`` is 0.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ptq.errors import PtqUsageError

STATE_FILE = "state.json"
STATE_VERSION = 3


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable hash of everything that determines the output."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (calibration token ids in the fingerprint)."""
    return hashlib.sha256(
        t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    ).hexdigest()


@dataclass
class Checkpointer:
    """The work folder of one run.

    Args:
        work: The folder (created on the first checkpoint).
        key: :func:`fingerprint` of the command.
        restart: Discard a work folder of another command instead of refusing.
        interval_s: Minimum seconds between checkpoints (0: after every block).
        enabled: Whether this process writes checkpoints (rank 0 of a job).
    """

    work: Path
    key: str
    restart: bool = False
    interval_s: float = 60.0
    enabled: bool = True
    _last: float = field(default_factory=time.perf_counter)

    def _state(self) -> dict[str, Any] | None:
        path = self.work / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if state.get("fingerprint") != self.key or state.get("version") != STATE_VERSION:
            if not self.restart:
                raise PtqUsageError(
                    f"{self.work} holds an interrupted run of a different command or config; "
                    "rerun the original command to resume it, or pass --restart"
                )
            return None
        return dict(state)

    def open(self) -> bool:
        """Make the work folder ready before anything is written to it.

        A folder holding this command's checkpoint is kept (True: the run resumes);
        anything else there (a run killed before its first checkpoint, or, with
        ``restart``, another command's run) is removed.

        Raises:
            PtqUsageError: The folder holds another command's run and ``restart`` is off.
        """
        resumable = self._state() is not None
        if not resumable:
            self.clear()
        self.work.mkdir(parents=True, exist_ok=True)
        return resumable

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """The last checkpoint of this command: ``(state, streams)``, or None.

        Raises:
            PtqUsageError: The folder holds another command's run and ``restart`` is off.
        """
        state = self._state()
        if state is None:
            return None
        folder = self.work / str(state["streams"])
        streams = {}
        for key in state["stream_keys"]:
            streams[key] = load_file(str(folder / f"{key}.safetensors"))["t"]
        return state, streams

    def clear(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def due(self) -> bool:
        return self.enabled and time.perf_counter() - self._last >= self.interval_s

    def save(self, state: dict[str, Any], streams: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Write the ``streams`` (one tensor at a time) into a new folder, then ``state``
        (atomically), then drop the previous checkpoint's streams."""
        if not self.enabled:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        folder_name = f"streams-{int(state['next_block']):05d}"
        folder = self.work / folder_name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        keys = []
        for key, t in streams:
            save_file({"t": t.detach().contiguous().cpu()}, str(folder / f"{key}.safetensors"))
            keys.append(key)
        full = {
            "version": STATE_VERSION,
            "fingerprint": self.key,
            **state,
            "streams": folder_name,
            "stream_keys": keys,
        }
        tmp_state = self.work / (STATE_FILE + ".tmp")
        tmp_state.write_text(json.dumps(full, default=str))
        tmp_state.replace(self.work / STATE_FILE)
        for old in self.work.glob("streams-*"):
            if old.name != folder_name:
                shutil.rmtree(old, ignore_errors=True)
        self._last = time.perf_counter()
