"""Resumable runs: the work folder's state after each finished block.

A run that writes an output keeps a work folder ``.OUT.work`` beside it. After a block
is finished the runner may checkpoint: the activation streams entering the next block
(``streams.safetensors``), the writer's spool table, the records so far and the next
block's index (``state.json``), each replaced atomically, the state last, so the state
never names a half-written file. Rerunning the same command finds the state and
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ptq.errors import PtqUsageError

STATE_FILE = "state.json"
STREAMS_FILE = "streams.safetensors"
STATE_VERSION = 2


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
        streams = self.work / STREAMS_FILE
        return state, (load_file(str(streams)) if streams.is_file() else {})

    def clear(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def due(self) -> bool:
        return self.enabled and time.perf_counter() - self._last >= self.interval_s

    def save(self, state: dict[str, Any], streams: dict[str, torch.Tensor]) -> None:
        """Write ``streams`` then ``state`` (atomically, in that order)."""
        if not self.enabled:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        if streams:
            tmp = self.work / (STREAMS_FILE + ".tmp")
            save_file({k: v.contiguous() for k, v in streams.items()}, str(tmp))
            tmp.replace(self.work / STREAMS_FILE)
        full = {"version": STATE_VERSION, "fingerprint": self.key, **state}
        tmp_state = self.work / (STATE_FILE + ".tmp")
        tmp_state.write_text(json.dumps(full, default=str))
        tmp_state.replace(self.work / STATE_FILE)
        self._last = time.perf_counter()
