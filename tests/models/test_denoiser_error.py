"""Per-timestep SQNR and relative error of a denoiser against a reference."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from ptq.models.denoiser_error import bucket_of, sqnr_db, timestep_errors
from ptq.models.diffusion import Trajectories


class Scaled(nn.Module):
    """``y = x * (1 + delta * t / 1000)``: an error that grows with the timestep."""

    def __init__(self, delta: float) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, **_: Any) -> torch.Tensor:
        return sample * (1 + self.delta * timestep.view(-1, 1, 1, 1).float() / 1000)


def _trajectories() -> Trajectories:
    gen = torch.Generator().manual_seed(0)
    return Trajectories(
        latents=torch.randn(4, 3, 2, 4, 4, generator=gen),
        timesteps=torch.tensor([900, 600, 300, 0]),
        cond=None,
    )


def test_errors_match_their_definitions() -> None:
    traj = _trajectories()
    got = timestep_errors(Scaled(0.0), Scaled(0.1), traj, buckets=2)
    assert [(e.low, e.high, e.steps) for e in got] == [(0, 500, 2), (500, 1000, 2)]
    for e, steps in zip(got, ([2, 3], [0, 1]), strict=True):
        y = traj.latents[steps].double()
        t = traj.timesteps[steps].double().view(-1, 1, 1, 1, 1)
        err = y * 0.1 * t / 1000
        assert e.sqnr_db == pytest.approx(10 * math.log10(y.pow(2).sum() / err.pow(2).sum()))
        assert e.rel_error == pytest.approx(float((0.1 * t / 1000).mean()))
    assert got[1].sqnr_db < got[0].sqnr_db
    assert got[0].label == "t 0-499"


def test_identical_models_have_no_error_and_empty_buckets_are_dropped() -> None:
    got = timestep_errors(Scaled(0.0), Scaled(0.0), _trajectories(), buckets=10)
    assert [e.low for e in got] == [0, 300, 600, 900]
    assert all(e.sqnr_db == math.inf and e.rel_error == 0.0 for e in got)
    with pytest.raises(ValueError, match="buckets"):
        timestep_errors(Scaled(0.0), Scaled(0.0), _trajectories(), buckets=0)


def test_bucket_edges() -> None:
    assert [bucket_of(t, 4) for t in (0, 249, 250, 999, 1000)] == [0, 0, 1, 3, 3]


def test_sqnr_of_tensors() -> None:
    ref = torch.tensor([3.0, 4.0])
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)
    assert sqnr_db(ref, ref) == math.inf
