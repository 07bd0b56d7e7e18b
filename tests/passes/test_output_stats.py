"""Per-channel least-squares output correction: gain and shift against a direct fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptq.passes.output_stats import ChannelMoments


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    fp = torch.randn(3, 50, 4, generator=gen) * torch.tensor([1.0, 2.0, 0.5, 3.0])
    noise = 0.3 * torch.randn(3, 50, 4, generator=gen)
    q = 0.8 * fp + 0.1 + noise  # shrunk, shifted and noisy, like a quantized output
    return fp, q


def test_gain_and_shift_are_the_per_channel_least_squares_fit() -> None:
    fp, q = _pair()
    mom = ChannelMoments(4)
    for i in range(3):  # accumulated over batches
        mom.add(fp[i], q[i])
    gain, shift = mom.gain(0.01, 100.0), mom.shift(mom.gain(0.01, 100.0))
    f, x = fp.reshape(-1, 4).double().numpy(), q.reshape(-1, 4).double().numpy()
    for c in range(4):
        slope, intercept = np.polyfit(x[:, c], f[:, c], 1)
        assert gain[c].item() == pytest.approx(slope, rel=1e-5)
        assert shift[c].item() == pytest.approx(intercept, rel=1e-4, abs=1e-6)
    plain = mom.shift()
    np.testing.assert_allclose(plain.numpy(), (f - x).mean(0), rtol=1e-5, atol=1e-7)


def test_mse_reduction_matches_the_direct_computation() -> None:
    fp, q = _pair(1)
    mom = ChannelMoments(4)
    mom.add(fp, q)
    for gain in (None, mom.gain()):
        shift = mom.shift(gain)
        g = torch.ones(4) if gain is None else gain
        before = (fp - q).pow(2).reshape(-1, 4).mean(0)
        after = (fp - g * q - shift).pow(2).reshape(-1, 4).mean(0)
        torch.testing.assert_close(mom.mse_reduction(gain), before - after, rtol=1e-4, atol=1e-6)
        assert bool((mom.mse_reduction(gain) > 0).all())


def test_channel_dim_constant_channels_and_clamp() -> None:
    fp = torch.randn(2, 3, 5, 5)
    q = fp.clone()
    q[:, 1] = 0.7  # a dead (constant) channel: no slope to fit
    q[:, 2] = 0.01 * fp[:, 2]  # needs gain 100: clamped
    mom = ChannelMoments(3)
    mom.add(fp, q, channel_dim=1)
    gain = mom.gain(0.5, 2.0)
    assert gain.tolist() == pytest.approx([1.0, 1.0, 2.0], rel=1e-5)
    with pytest.raises(ValueError, match="equal shape"):
        mom.add(fp, q[:, :2], channel_dim=1)
    with pytest.raises(ValueError, match="no samples"):
        ChannelMoments(3).shift()
    with pytest.raises(ValueError, match="bounds"):
        mom.gain(1.5, 2.0)
