"""Observers on known distributions; streaming equals one-shot."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from ptq.calibration.observers import (
    ActivationStats,
    KLObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    _kl_divergences,
)
from ptq.formats import FP8_E4M3, INT4, INT8, ElementFormat

OUTLIERS = torch.tensor([40.0, -35.0, 30.0, 50.0, -45.0])


def gaussian_with_outliers(n: int = 50_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[: OUTLIERS.numel()] = OUTLIERS
    return x


def test_minmax_equals_amax_exactly() -> None:
    x = gaussian_with_outliers()
    obs = MinMaxObserver()
    obs.update(x)
    assert obs.amax_for(INT8).item() == 50.0
    assert obs.scale(INT8).item() == pytest.approx(50.0 / 127, rel=0, abs=1e-7)
    assert obs.scale(INT8).shape == ()


@pytest.mark.parametrize(
    "make",
    [lambda: PercentileObserver(99.9), MSEObserver, KLObserver],
    ids=["percentile", "mse", "kl"],
)
@pytest.mark.parametrize("element", [INT8, INT4], ids=["int8", "int4"])
def test_clipping_observers_clip_outliers(
    make: Callable[[], Observer], element: ElementFormat
) -> None:
    x = gaussian_with_outliers()
    obs = make()
    obs.update(x)
    c = obs.amax_for(element).item()
    assert 0.5 < c < 50.0


def test_percentile_matches_quantile_within_a_bin() -> None:
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(3))
    obs = PercentileObserver(99.0)
    obs.update(x)
    exact = torch.quantile(x.abs(), 0.99).item()
    assert obs.range is not None
    width = obs.range.item() / obs.bins
    assert abs(obs.amax_for(INT8).item() - exact) <= width + 1e-6


def test_mse_clip_beats_amax_on_outliers() -> None:
    """The chosen clip has lower quantization MSE on the data than min-max scaling."""
    x = gaussian_with_outliers()
    mse, mm = MSEObserver(), MinMaxObserver()
    mse.update(x)
    mm.update(x)

    def err(scale: torch.Tensor) -> float:
        q = torch.clamp(torch.round(x / scale), -7, 7) * scale
        return float((q - x).pow(2).sum())

    assert err(mse.scale(INT4)) < err(mm.scale(INT4))


def test_kl_clips_harder_for_fewer_levels() -> None:
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(1))
    obs = KLObserver()
    obs.update(x)
    c8, c4 = obs.amax_for(INT8).item(), obs.amax_for(INT4).item()
    assert c4 < c8 <= x.abs().max().item()
    assert c8 > 2.0  # a standard normal is not clipped below 2 sigma at 8 bits


@pytest.mark.parametrize(
    "make",
    [MinMaxObserver, lambda: PercentileObserver(99.5), MSEObserver, KLObserver],
    ids=["minmax", "percentile", "mse", "kl"],
)
def test_streaming_equals_one_shot(make: Callable[[], Observer]) -> None:
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(3000, generator=g) * s for s in (0.1, 1.0, 7.0, 0.5)]
    batches[2][0] = 90.0  # forces histogram range growth in the middle
    stream, once = make(), make()
    for b in batches:
        stream.update(b)
    once.update(torch.cat(batches))
    for el in (INT8, FP8_E4M3):
        assert torch.equal(stream.amax_for(el), once.amax_for(el))
    if hasattr(stream, "hist"):
        assert torch.equal(stream.hist, once.hist)


def test_per_channel_observers() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4000, 3, generator=g) * torch.tensor([1.0, 10.0, 0.1])
    for obs in (MinMaxObserver(axis=-1), PercentileObserver(99.0, axis=-1), KLObserver(axis=1)):
        obs.update(x)
        s = obs.scale(INT8)
        assert s.shape == (3,)
        assert s[1] > s[0] > s[2]
    mm = MinMaxObserver(axis=-1)
    mm.update(x)
    assert torch.equal(mm.amax_for(INT8), x.abs().amax(dim=0))


def test_observer_errors() -> None:
    with pytest.raises(ValueError, match="before any update"):
        MinMaxObserver().scale(INT8)
    with pytest.raises(ValueError, match="NaN/Inf"):
        MinMaxObserver().update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(0.0)
    obs = MinMaxObserver(axis=-1)
    obs.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="channels"):
        obs.update(torch.zeros(2, 4))


def test_activation_stats() -> None:
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(2, 5, 4, generator=g) for _ in range(3)]
    stats = ActivationStats(4)
    for b in batches:
        stats.update(b)
    full = torch.cat([b.reshape(-1, 4) for b in batches])
    assert stats.count == 30
    assert torch.equal(stats.absmax, full.abs().amax(dim=0))
    torch.testing.assert_close(stats.mean, full.mean(dim=0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        stats.update(torch.zeros(3, 5))


def _kl_reference(hist: list[float], levels: int) -> list[float]:
    """TensorRT's entropy loop written out bin by bin (the oracle for the prefix-sum form)."""
    n, out = len(hist), []
    for i in range(levels, n + 1):
        p = hist[:i]
        p = [*p[:-1], p[-1] + sum(hist[i:])]
        m, q = i // levels, [0.0] * i
        for c in range(levels):
            lo, hi = c * m, (i if c == levels - 1 else (c + 1) * m)
            nz = [j for j in range(lo, hi) if p[j] > 0]
            for j in nz:
                q[j] = sum(hist[lo:hi]) / len(nz)
        if any(pj > 0 and qj == 0 for pj, qj in zip(p, q, strict=True)):
            out.append(math.inf)
            continue
        ps, qs = sum(p), sum(q)
        out.append(
            sum(a / ps * math.log((a / ps) / (b / qs)) for a, b in zip(p, q, strict=True) if a > 0)
        )
    return out


def test_kl_prefix_sums_match_the_bin_by_bin_loop() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4000, generator=g).abs()
    hist = torch.histc(x, bins=64, min=0, max=4).double()
    hist[40:43] = 0  # empty bins make some candidates infinite
    got = _kl_divergences(hist, 8)
    ref = torch.tensor(_kl_reference(hist.tolist(), 8), dtype=torch.float64)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-9, atol=1e-12)
