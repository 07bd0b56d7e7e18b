"""Activation streams: the next block's hidden states are staged beside the current ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ptq.calibration.blocks import BlockInput
from ptq.calibration.streams import Stream


@pytest.mark.parametrize("spilled", [False, True])
def test_staged_hiddens_replace_the_stream_on_commit(spilled: bool, tmp_path: Path) -> None:
    inputs = [BlockInput(torch.full((1, 3, 4), float(i)), (), {}) for i in range(3)]
    stream = Stream.create("fp", inputs, tmp_path if spilled else None)
    nxt = [torch.full((1, 3, 4), 10.0 + i) for i in range(3)]
    for i, h in enumerate(nxt):
        stream.stage(i, h)
        assert torch.equal(stream.hidden(i), inputs[i].hidden)  # still the block's input
    stream.commit()
    for i, h in enumerate(nxt):
        assert torch.equal(stream.hidden(i), h)
        assert stream.input(i).hidden.shape == h.shape
    if spilled:  # one file per batch, no staged leftovers
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            f"fp-{i:05d}.safetensors" for i in range(3)
        ]


def test_commit_needs_every_batch(tmp_path: Path) -> None:
    inputs = [BlockInput(torch.zeros(1, 2, 4), (), {}) for _ in range(2)]
    stream = Stream.create("calib", inputs, tmp_path)
    stream.stage(0, torch.ones(1, 2, 4))
    with pytest.raises(ValueError, match="not every batch"):
        stream.commit()
