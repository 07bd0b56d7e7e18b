"""AdaRound maths: learned rounding beats nearest, binarises h, works on FP grids."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from ptq.formats import FP4_E2M1, INT4, PerGroup, QuantFormat, dequantize, fake_quantize
from ptq.formats.minifloat import round_to_float_grid
from ptq.passes.adaround_math import (
    AdaRoundConfig,
    RoundingGrid,
    adaround_layer,
    adaround_reconstruct,
    beta_at,
    rectified_sigmoid,
    rounding_regularizer,
)

INT4_G32 = QuantFormat(INT4, PerGroup(32))
INT4_G32_ASYM = QuantFormat(INT4, PerGroup(32), symmetric=False)
NVFP4 = QuantFormat(FP4_E2M1, PerGroup(16), scale_format="e4m3", global_scale=True)
CFG = AdaRoundConfig(iterations=250, batch_size=128, lr=0.1)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add contention on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_problem(n: int = 32, k: int = 128, rows: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, 8, generator=g) @ torch.randn(8, k, generator=g)
    return w, x + 0.1 * torch.randn(rows, k, generator=g)


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - q) @ x.T).norm())


@pytest.mark.parametrize(
    "fmt", [INT4_G32, INT4_G32_ASYM, NVFP4], ids=["int4", "int4_asym", "nvfp4"]
)
def test_adaround_beats_nearest_and_binarises(fmt: QuantFormat) -> None:
    w, x = make_problem()
    result = adaround_layer(w, x, fmt, config=CFG)
    assert output_error(w, result.weight, x) < 0.8 * output_error(w, fake_quantize(w, fmt), x)
    assert result.non_binary_fraction() < 0.05
    assert torch.equal(
        dequantize(result.qtensor).view(torch.int32), result.weight.view(torch.int32)
    )


def test_fp_grid_candidates_bracket_and_lie_on_grid() -> None:
    w, _ = make_problem(16, 64)
    grid = RoundingGrid.from_weight(w * 3.0, NVFP4)
    y = w * 3.0 / grid.scale
    lo, hi = grid.codes(torch.zeros_like(y)), grid.codes(torch.ones_like(y))
    assert torch.equal(round_to_float_grid(lo, FP4_E2M1), lo)
    assert torch.equal(round_to_float_grid(hi, FP4_E2M1), hi)
    inside = y.abs() < 6.0
    assert torch.all((lo <= y)[inside]) and torch.all((y <= hi)[inside])
    nearest = round_to_float_grid(y, FP4_E2M1)
    assert torch.all((nearest == lo) | (nearest == hi))


def test_rectified_sigmoid_and_regulariser() -> None:
    v = torch.tensor([-10.0, 0.0, 10.0])
    h = rectified_sigmoid(v, 1.1, -0.1)
    assert h.tolist() == [0.0, 0.5, 1.0]
    assert float(rounding_regularizer(torch.tensor([0.0, 1.0]), 2.0)) == 0.0
    assert float(rounding_regularizer(torch.tensor([0.5]), 20.0)) == 1.0
    cfg = AdaRoundConfig(iterations=100)
    assert beta_at(19, cfg) is None
    assert beta_at(20, cfg) == pytest.approx(20.0)
    assert beta_at(99, cfg) == pytest.approx(2.0 + 18.0 / 80)


def test_block_reconstruction_through_callable() -> None:
    """BRECQ mode: two weights learned jointly through a nonlinear block."""
    w1, x = make_problem(64, 128)
    w2 = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) / 8

    def block(ws: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(xb, ws["up"])), ws["down"])

    fp = {"up": w1, "down": w2}
    target = block(fp, x)
    fmts = {"up": INT4_G32, "down": INT4_G32}
    out = adaround_reconstruct(fp, fmts, block, x, target, CFG)
    rtn = {k: fake_quantize(v, fmts[k]) for k, v in fp.items()}
    ours = {k: r.weight for k, r in out.items()}
    assert (block(ours, x) - target).norm() < 0.8 * (block(rtn, x) - target).norm()


def test_seeded_runs_are_identical() -> None:
    w, x = make_problem(16, 64, 256)
    cfg = AdaRoundConfig(iterations=60, batch_size=64, seed=7)
    a = adaround_layer(w, x, INT4_G32, config=cfg)
    b = adaround_layer(w, x, INT4_G32, config=cfg)
    assert torch.equal(a.qtensor.codes, b.qtensor.codes)
    assert torch.equal(a.h, b.h)


def test_bad_arguments_are_rejected() -> None:
    w, x = make_problem(8, 64, 16)
    with pytest.raises(ValueError, match="inputs"):
        adaround_layer(w, x[:, :32], INT4_G32)
    with pytest.raises(ValueError, match="warmup"):
        AdaRoundConfig(warmup=1.5)
