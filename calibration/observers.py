"""Observers for static activation ranges: min-max, percentile, MSE and KL (entropy).

Every observer streams ``update(x)`` over calibration batches and returns a symmetric
scale ``s = c / q_max`` from ``scale(element)``, where ``c`` is the clipping threshold
it chose and ``q_max`` the element format's largest magnitude. ``axis=None`` keeps one
statistic per tensor; ``axis=a`` one per index of dimension ``a`` (per channel).

Histograms accumulate on the device of the data (CPU or CUDA, same code); the clip
searches run on the CPU copy of the 2048 bins.

The histogram observers keep a 2048-bin histogram of ``|x|`` over ``[0, R)`` with
``R = 2^(floor(log2 amax) + 1)`` a power of two strictly above the running ``amax``.
When ``amax`` grows, ``R`` grows by a power of two ``f`` and every ``f`` old bins merge
into one new bin; since the bin width is a power of two, ``floor(v / w) // f ==
floor(v / (f w))`` exactly, so streaming histograms equal the one-shot histogram.

* percentile: the upper edge of the bin where the cumulative count reaches ``p``.
* MSE: ``argmin_c sum_b h_b (Q_c(v_b) - v_b)^2`` over bin centres ``v_b`` and candidate
  clips ``c``, with ``Q_c`` rounding onto the element grid scaled by ``c / q_max``
  (Banner et al., "Post-training 4-bit quantization of convolution networks", 2019).
* KL: TensorRT entropy calibration (Migacz, "8-bit Inference with TensorRT", GTC
  2017): for each candidate bin ``i``, ``P`` = first ``i`` bins with the tail folded into
  the last, ``Q`` = the first ``i`` bins merged into ``L`` levels and spread back over
  the bins where ``P > 0``; pick the ``i`` minimising ``KL(P || Q)``; ``c`` = upper edge of bin ``i``. ``L`` is
  ``q_max + 1`` for integers and the number of non-negative finite grid values for
  minifloats (which treats their non-uniform grid as uniform: an approximation).
"""

from __future__ import annotations

import math

import torch

from ptq.formats import ElementFormat, FloatFormat
from ptq.formats.minifloat import decode_table, round_finite


def _rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``x`` as fp32 ``[C, n]`` (``C = 1`` per tensor)."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"observer axis {axis} is out of range for a {x.dim()}-D input")
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _check(x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError("observer got NaN/Inf activations; check the calibration data")


def _to_scale(amax: torch.Tensor, element: ElementFormat) -> torch.Tensor:
    s = amax.float() / element.max_value
    return torch.where(s > 0, s, torch.ones_like(s))


class Observer:
    """Base class: ``update`` batches, then ``amax_for(element)`` / ``scale(element)``.

    Args:
        axis: None for per-tensor statistics, else the channel dimension.
    """

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.channels: int | None = None

    def _rows_checked(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x, self.axis)
        _check(rows)
        if self.channels is not None and rows.shape[0] != self.channels:
            raise ValueError(
                f"{type(self).__name__} saw {self.channels} channels, now {rows.shape[0]}"
            )
        self.channels = rows.shape[0]
        return rows

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def amax_for(self, element: ElementFormat) -> torch.Tensor:
        """The clipping threshold ``c`` (``[]`` per tensor, ``[C]`` per channel)."""
        raise NotImplementedError

    def scale(self, element: ElementFormat) -> torch.Tensor:
        """Symmetric scale ``c / q_max`` for ``element`` (1 where nothing was seen)."""
        if self.channels is None:
            raise ValueError(f"{type(self).__name__}.scale() called before any update()")
        amax = self.amax_for(element)
        return _to_scale(amax if self.axis is not None else amax.reshape(()), element)


class MinMaxObserver(Observer):
    """Running minimum and maximum; the clip is ``max(|min|, |max|)``, exactly ``amax``."""

    def __init__(self, axis: int | None = None) -> None:
        super().__init__(axis)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        rows = self._rows_checked(x)
        if rows.shape[1] == 0:
            return
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    def amax_for(self, element: ElementFormat) -> torch.Tensor:
        if self.min_val is None or self.max_val is None:
            return torch.zeros(self.channels or 1)
        return torch.maximum(self.min_val.abs(), self.max_val.abs())


class HistogramObserver(Observer):
    """Exactly mergeable 2048-bin histogram of ``|x|`` (see module docstring)."""

    def __init__(self, axis: int | None = None, bins: int = 2048) -> None:
        super().__init__(axis)
        if bins < 16 or bins & (bins - 1):
            raise ValueError(f"histogram bins must be a power of two >= 16, got {bins}")
        self.bins = bins
        self.hist: torch.Tensor | None = None  # [C, bins] float64 counts
        self.range: torch.Tensor | None = None  # [C] power-of-two R
        self.amax: torch.Tensor | None = None  # [C] running max |x|

    def update(self, x: torch.Tensor) -> None:
        rows = self._rows_checked(x).abs()
        if rows.shape[1] == 0:
            return
        dev = rows.device
        amax = rows.amax(dim=1)
        tiny = torch.finfo(torch.float32).tiny
        new_r = torch.exp2(torch.floor(torch.log2(amax.clamp_min(tiny))) + 1)
        if self.hist is None or self.range is None or self.amax is None:
            self.hist = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64, device=dev)
            self.range, self.amax = new_r, amax
        else:
            self.amax = torch.maximum(self.amax, amax)
            grown = torch.maximum(self.range, new_r)
            factor = (grown / self.range).round().long()
            if bool((factor > 1).any()):
                bins = torch.arange(self.bins, device=dev)
                idx = torch.div(bins, factor[:, None], rounding_mode="floor")
                merged = torch.zeros_like(self.hist).scatter_add_(1, idx, self.hist)
                self.hist, self.range = merged, grown
        width = (self.range / self.bins)[:, None]
        idx = torch.floor(rows / width).long().clamp_(0, self.bins - 1)
        self.hist.scatter_add_(1, idx, torch.ones_like(rows, dtype=torch.float64))

    def _state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Histogram, range and amax on the CPU (the clip searches are small and serial)."""
        if self.hist is None or self.range is None or self.amax is None:
            raise ValueError(f"{type(self).__name__} has no data; call update() first")
        return self.hist.cpu(), self.range.cpu(), self.amax.cpu()


class PercentileObserver(HistogramObserver):
    """Clip at the ``percentile`` (0-100] of ``|x|`` (bin upper edge, capped at amax)."""

    def __init__(self, percentile: float = 99.99, axis: int | None = None, bins: int = 2048):
        super().__init__(axis, bins)
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def amax_for(self, element: ElementFormat) -> torch.Tensor:
        hist, rng, amax = self._state()
        cdf = hist.cumsum(dim=1)
        target = cdf[:, -1:] * (self.percentile / 100.0)
        idx = torch.searchsorted(cdf, target).squeeze(1).clamp_(max=self.bins - 1)
        edge = (idx + 1).double() * (rng.double() / self.bins)
        return torch.minimum(edge.float(), amax)


def _grid_error(values: torch.Tensor, clip: torch.Tensor, element: ElementFormat) -> torch.Tensor:
    """``(Q_c(v) - v)^2`` for bin centres ``values [B]`` and clips ``clip [N]`` -> ``[N, B]``."""
    s = (clip / element.max_value)[:, None]
    y = values[None, :] / s
    if isinstance(element, FloatFormat):
        q = round_finite(y, element)
    else:
        q = torch.clamp(torch.round(y), -element.max_value, element.max_value)
    return (q * s - values[None, :]).pow(2)


class MSEObserver(HistogramObserver):
    """Clip minimising the histogram-weighted quantization MSE (``grid`` candidates)."""

    def __init__(self, axis: int | None = None, bins: int = 2048, grid: int = 100) -> None:
        super().__init__(axis, bins)
        if grid < 1:
            raise ValueError(f"MSE observer grid must be >= 1, got {grid}")
        self.grid = grid

    def amax_for(self, element: ElementFormat) -> torch.Tensor:
        hist, rng, amax = self._state()
        out = torch.empty_like(amax)
        ratios = torch.arange(1, self.grid + 1, dtype=torch.float32) / self.grid
        for c in range(hist.shape[0]):
            centres = (torch.arange(self.bins) + 0.5) * (rng[c] / self.bins)
            keep = hist[c] > 0
            clips = (ratios * amax[c]).clamp_min(torch.finfo(torch.float32).tiny)
            err = (_grid_error(centres[keep], clips, element) * hist[c][keep].float()).sum(1)
            out[c] = clips[int(torch.argmin(err))] if bool(keep.any()) else 0.0
        return out


def _levels(element: ElementFormat) -> int:
    if isinstance(element, FloatFormat):
        return sum(1 for v in decode_table(element) if math.isfinite(v) and v >= 0) - 1
    return int(element.max_value) + 1


def _xlogx(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v > 0, v * v.clamp_min(1e-300).log(), 0.0)


def _kl_divergences(hist: torch.Tensor, levels: int) -> torch.Tensor:
    """``KL(P_i || Q_i)`` for every candidate ``i = levels .. n``, in ``O(n * levels)``.

    As TensorRT: ``P_i`` = ``hist[:i]`` with the tail folded into bin ``i - 1``; ``Q_i``
    merges ``hist[:i]`` into ``levels`` chunks of ``m = i // levels`` bins (the last takes
    the rest) and spreads each chunk's mass ``S_c`` evenly over its ``N_c`` bins where
    ``P_i > 0``. With ``Q_j = S_c / N_c`` on chunk ``c`` and both normalised,
    ``KL = (sum P log P - sum_c P_c log(S_c / N_c)) / sum P - log sum P + log sum Q``,
    which prefix sums give for all ``i`` at once.
    """
    n = hist.numel()
    h = hist.double()
    zero = torch.zeros(1, dtype=h.dtype)
    cs = torch.cat([zero, h.cumsum(0)])
    cpl = torch.cat([zero, _xlogx(h).cumsum(0)])
    cnz = torch.cat([zero, (h > 0).double().cumsum(0)])
    i = torch.arange(levels, n + 1)
    tail = cs[n] - cs[i]
    last = h[i - 1]
    c = torch.arange(levels)
    m = (i // levels)[:, None]
    start = c[None, :] * m
    end = torch.where(c[None, :] == levels - 1, i[:, None], start + m)
    s_c = cs[end] - cs[start]
    n_c = cnz[end] - cnz[start]
    p_c = s_c.clone()
    p_c[:, -1] += tail
    n_c[:, -1] += ((last == 0) & (tail > 0)).double()
    bad = ((p_c > 0) & (s_c <= 0)).any(1)
    plogq = torch.where(p_c > 0, p_c * (s_c / n_c.clamp_min(1)).clamp_min(1e-300).log(), 0.0)
    plogp = cpl[i] - _xlogx(last) + _xlogx(last + tail)
    total = cs[n]
    kl = (plogp - plogq.sum(1)) / total - total.log() + cs[i].clamp_min(1e-300).log()
    return torch.where(bad, torch.inf, kl)


class KLObserver(HistogramObserver):
    """TensorRT-style entropy calibration on a 2048-bin histogram (per tensor or channel)."""

    def amax_for(self, element: ElementFormat) -> torch.Tensor:
        hist, rng, amax = self._state()
        levels = _levels(element)
        out = torch.empty_like(amax)
        levels = min(levels, self.bins)
        for c in range(hist.shape[0]):
            i = levels + int(torch.argmin(_kl_divergences(hist[c], levels)))
            out[c] = min(float(i) * float(rng[c]) / self.bins, float(amax[c]))
        return out


class ActivationStats:
    """Per-channel ``absmax``, ``mean`` and row count of inputs ``[..., C]`` (SmoothQuant)."""

    def __init__(self, channels: int) -> None:
        if channels < 1:
            raise ValueError(f"ActivationStats channels must be >= 1, got {channels}")
        self.channels = channels
        self.absmax = torch.zeros(channels)
        self._sum = torch.zeros(channels, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.channels:
            raise ValueError(
                f"ActivationStats expects [..., {self.channels}], got {tuple(x.shape)}"
            )
        rows = x.detach().reshape(-1, self.channels).float()
        _check(rows)
        if rows.shape[0] == 0:
            return
        self.absmax = torch.maximum(self.absmax, rows.abs().amax(dim=0).cpu())
        self._sum += rows.double().sum(dim=0).cpu()
        self.count += rows.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        """Per-channel mean over every row seen (zeros before any update)."""
        return (self._sum / max(self.count, 1)).float()
