"""Activation streams: what enters the current block, one entry per calibration batch.

A stream holds, for every batch, the hidden states entering the block the runner is at
plus the fixed arguments the first block received (rotary tables, masks, ...). The
runner keeps up to four: the quantized model's calibration activations (what GPTQ and
the other statistics see), the transformed floating-point model's (SmoothQuant's, when
a pass observes it), and, with evaluation, held-out windows through the original and
the quantized model. Hidden states live on the run's device, or with ``offload`` set,
in one safetensors file per batch under that folder (only the batch being computed is
in memory): the ``--offload-dir`` option.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ptq.calibration.blocks import BlockInput


@dataclass
class Stream:
    """Per-batch inputs of the current block.

    Args:
        name: A short name (file names under ``offload``, checkpoint keys).
        inputs: One :class:`BlockInput` per batch; with ``offload`` their ``hidden`` is
            a placeholder and the real tensor is on disk.
        offload: Folder for the hidden states (None: kept in memory).
    """

    name: str
    inputs: list[BlockInput]
    offload: Path | None = None
    _device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def create(cls, name: str, inputs: list[BlockInput], offload: Path | None) -> Stream:
        device = inputs[0].hidden.device if inputs else torch.device("cpu")
        stream = cls(name, [], offload, device)
        if offload is not None:
            offload.mkdir(parents=True, exist_ok=True)
        stream.inputs = [replace(x) for x in inputs]
        for i, x in enumerate(inputs):
            stream.set_hidden(i, x.hidden)
        return stream

    def __len__(self) -> int:
        return len(self.inputs)

    def _file(self, i: int) -> Path:
        assert self.offload is not None
        return self.offload / f"{self.name}-{i:05d}.safetensors"

    def hidden(self, i: int) -> torch.Tensor:
        """Batch ``i``'s hidden states (read from disk when offloaded)."""
        if self.offload is None:
            return self.inputs[i].hidden
        return load_file(str(self._file(i)))["hidden"].to(self._device)

    def set_hidden(self, i: int, hidden: torch.Tensor) -> None:
        if self.offload is None:
            self.inputs[i] = replace(self.inputs[i], hidden=hidden)
            return
        tmp = self._file(i).with_suffix(".tmp")
        save_file({"hidden": hidden.detach().contiguous().cpu()}, str(tmp))
        tmp.replace(self._file(i))
        self.inputs[i] = replace(self.inputs[i], hidden=_placeholder(hidden))

    def input(self, i: int) -> BlockInput:
        """Batch ``i``'s full block input."""
        x = self.inputs[i]
        return x if self.offload is None else replace(x, hidden=self.hidden(i))

    def hiddens(self) -> dict[str, torch.Tensor]:
        """Every batch's hidden states by checkpoint key (CPU, for saving)."""
        return {f"{self.name}.{i}": self.hidden(i).detach().cpu() for i in range(len(self))}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        """Replace the hidden states with a checkpoint's (same batches)."""
        for i in range(len(self)):
            self.set_hidden(i, saved[f"{self.name}.{i}"].to(self._device))


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")
