"""Activation streams: what enters the current block, one entry per calibration batch.

A stream holds, for every batch, the hidden states entering the block the runner is at
plus the fixed arguments the first block received (rotary tables, masks, ...). The
runner keeps up to four: the quantized model's calibration activations (what GPTQ and
the other statistics see), the transformed floating-point model's (SmoothQuant's, when
a pass observes it), and, with evaluation, held-out windows through the original and
the quantized model.

Hidden states live on the run's device, or, with a :class:`Spill` folder, in one
safetensors file per batch (only the batch being computed is in memory): a streamed
run on the CPU spills into its work folder by default (the files stay in the page
cache, so a batch costs a memory copy, not a disk read), ``--offload-dir`` chooses the
folder, and on CUDA the streams stay on the device unless it is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ptq.calibration.blocks import BlockInput


@dataclass
class Spill:
    """Tensors by key, in memory (``folder`` None) or one file each under ``folder``.

    Args:
        folder: Where spilled tensors go (created on first use).
        device: Where :meth:`get` puts them back.
        prefix: Of this spill's file names (several spills may share a folder).
    """

    folder: Path | None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prefix: str = ""
    _memory: dict[str, torch.Tensor] = field(default_factory=dict)

    def _file(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{self.prefix}{key}.safetensors"

    def clear(self) -> None:
        """Forget every tensor put here."""
        self._memory.clear()
        if self.folder is not None and self.prefix:
            for f in self.folder.glob(f"{self.prefix}*.safetensors"):
                f.unlink()

    def put(self, key: str, t: torch.Tensor) -> None:
        if self.folder is None:
            self._memory[key] = t
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._file(key).with_suffix(".tmp")
        save_file({"t": t.detach().contiguous().cpu()}, str(tmp))
        tmp.replace(self._file(key))

    def get(self, key: str) -> torch.Tensor:
        if self.folder is None:
            return self._memory[key]
        return load_file(str(self._file(key)))["t"].to(self.device)

    def move(self, key: str, new_key: str) -> None:
        """Put the tensor of ``key`` under ``new_key`` (replacing it), without a copy."""
        if self.folder is None:
            self._memory[new_key] = self._memory.pop(key)
        else:
            self._file(key).replace(self._file(new_key))

    def drop(self, key: str) -> None:
        if self.folder is None:
            self._memory.pop(key, None)
        else:
            self._file(key).unlink(missing_ok=True)


@dataclass
class Stream:
    """Per-batch inputs of the current block.

    Args:
        name: A short name (file names when spilled, checkpoint keys).
        inputs: One :class:`BlockInput` per batch; their ``hidden`` is a ``meta``
            placeholder, the real tensor is in ``spill``.
        spill: Where the hidden states are.
    """

    name: str
    inputs: list[BlockInput]
    spill: Spill
    staged: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def create(cls, name: str, inputs: list[BlockInput], offload: Path | None) -> Stream:
        device = inputs[0].hidden.device if inputs else torch.device("cpu")
        stream = cls(name, [replace(x) for x in inputs], Spill(offload, device))
        for i, x in enumerate(inputs):
            stream.set_hidden(i, x.hidden)
        return stream

    def __len__(self) -> int:
        return len(self.inputs)

    def hidden(self, i: int) -> torch.Tensor:
        """Batch ``i``'s hidden states."""
        return self.spill.get(f"{self.name}-{i:05d}")

    def set_hidden(self, i: int, hidden: torch.Tensor) -> None:
        self.spill.put(f"{self.name}-{i:05d}", hidden)
        self.inputs[i] = replace(self.inputs[i], hidden=_placeholder(hidden))

    def input(self, i: int) -> BlockInput:
        """Batch ``i``'s full block input."""
        return replace(self.inputs[i], hidden=self.hidden(i))

    def stage(self, i: int, hidden: torch.Tensor) -> None:
        """Keep batch ``i``'s hidden states leaving the current block, where the stream
        keeps its own (spilled when it is), until :meth:`commit`; the batches entering
        the block stay readable meanwhile."""
        self.spill.put(f"{self.name}-next-{i:05d}", hidden)
        self.staged[i] = _placeholder(hidden)

    def commit(self) -> None:
        """The staged hidden states become the stream (every batch must be staged)."""
        if sorted(self.staged) != list(range(len(self))):
            raise ValueError(f"stream {self.name!r}: not every batch was staged")
        for i, placeholder in self.staged.items():
            self.spill.move(f"{self.name}-next-{i:05d}", f"{self.name}-{i:05d}")
            self.inputs[i] = replace(self.inputs[i], hidden=placeholder)
        self.staged.clear()

    def hiddens(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every batch's hidden states by checkpoint key, one at a time (for saving)."""
        for i in range(len(self)):
            yield f"{self.name}.{i}", self.hidden(i)

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        """Replace the hidden states with a checkpoint's (same batches)."""
        for i in range(len(self)):
            self.set_hidden(i, saved[f"{self.name}.{i}"].to(self.spill.device))


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")
