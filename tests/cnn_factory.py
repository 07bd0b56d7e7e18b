"""Tiny random CNNs for the tests of models built by code, written as factory files.

:func:`write_factory` writes ``FOLDER/net.py`` whose ``build()`` returns a small conv net
(strided stem, depthwise and grouped convs, batch-norms with random statistics, a
Conv1d, a Linear head), seeded so every call returns the same weights;
:func:`write_images` a folder of random-noise PNGs of assorted sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FACTORY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1, groups=2)
        self.seq = nn.Conv1d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(pixels)))
        x = torch.relu(self.bn1(self.dw(x)))
        x = torch.relu(self.pw(x)).flatten(2)
        return self.head(torch.relu(self.seq(x)).mean(-1))


def build() -> nn.Module:
    torch.manual_seed(SEED)
    net = Net()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return net


def not_a_module() -> int:
    return 3
"""


def write_factory(folder: Path, seed: int = 0) -> Path:
    """``folder/net.py`` (see the module docstring); ``build`` seeds with ``seed``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "net.py"
    path.write_text(FACTORY.replace("SEED", str(seed)))
    return path


def write_images(folder: Path, n: int = 4, seed: int = 0) -> Path:
    """``n`` random RGB/grey PNGs (40-70 px sides) in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(40, 70, size=2))
        shape = (h, w) if i % 3 == 2 else (h, w, 3)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(
            folder / f"img{i}.png"
        )
    return folder
