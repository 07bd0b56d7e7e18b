"""Per-channel output statistics of a quantized layer against its FP twin.

Quantization shifts the distribution of a layer's outputs: their mean (Nagel et al.,
"Data-Free Quantization", 2019, bias correction) and their scale (Hubara et al.,
"Accurate Post Training Quantization With Small Calibration Sets", ICML 2021, batch-norm
tuning: re-estimate the statistics a folded norm was computed with). Both are per-channel
affine corrections of the quantized output ``y_q``, fitted to the FP layer's output
``y_fp`` on the same inputs by least squares:

    min_{g, d} sum_n (y_fp,n - g y_q,n - d)^2
    =>  g = cov(y_fp, y_q) / var(y_q),   d = E[y_fp] - g E[y_q]

(ordinary least squares per channel). ``g = 1`` gives plain bias correction. We fit the
gain by least squares rather than by matching variances (the paper's re-estimated
statistics): quantization noise inflates ``var(y_q)``, and the least-squares gain is the
one that lowers the output MSE, shrinking toward zero as the noise grows. The gain acts
on the weight (``W <- g W``, folded into the per-channel scales) and the shift on the
bias.

:class:`ChannelMoments` accumulates the five sums in float64 over calibration batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChannelMoments:
    """Running per-channel sums of ``y_q``, ``y_fp``, ``y_q^2``, ``y_q y_fp`` and the count."""

    channels: int
    count: int = 0
    sum_q: torch.Tensor = field(init=False)
    sum_fp: torch.Tensor = field(init=False)
    sum_qq: torch.Tensor = field(init=False)
    sum_qfp: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"ChannelMoments needs >= 1 channel, got {self.channels}")
        self._reset(torch.device("cpu"))

    def _reset(self, device: torch.device) -> None:
        zeros = torch.zeros(self.channels, dtype=torch.float64, device=device)
        self.sum_q, self.sum_fp = zeros.clone(), zeros.clone()
        self.sum_qq, self.sum_qfp = zeros.clone(), zeros.clone()

    def add(self, fp_out: torch.Tensor, q_out: torch.Tensor, channel_dim: int = -1) -> None:
        """Add one batch of outputs (same shape; channels along ``channel_dim``)."""
        if fp_out.shape != q_out.shape or fp_out.shape[channel_dim] != self.channels:
            raise ValueError(
                f"ChannelMoments({self.channels}) needs two outputs of equal shape with "
                f"{self.channels} channels on dim {channel_dim}, got {tuple(fp_out.shape)} "
                f"and {tuple(q_out.shape)}"
            )
        f = fp_out.detach().double().movedim(channel_dim, -1).reshape(-1, self.channels)
        q = q_out.detach().double().movedim(channel_dim, -1).reshape(-1, self.channels)
        if self.count == 0 and self.sum_q.device != q.device:
            self._reset(q.device)  # the sums live where the outputs are (a GPU run)
        self.count += f.shape[0]
        self.sum_q += q.sum(0)
        self.sum_fp += f.sum(0)
        self.sum_qq += q.pow(2).sum(0)
        self.sum_qfp += (q * f).sum(0)

    def _require_data(self) -> None:
        if self.count == 0:
            raise ValueError("ChannelMoments has no samples; add calibration outputs first")

    def shift(self, gain: torch.Tensor | None = None) -> torch.Tensor:
        """``d = E[y_fp] - g E[y_q]`` (``g = 1`` if ``gain`` is None), float32 ``[C]``."""
        self._require_data()
        g = torch.ones_like(self.sum_q) if gain is None else gain.double()
        return ((self.sum_fp - g * self.sum_q) / self.count).float()

    def gain(self, lo: float = 0.5, hi: float = 2.0) -> torch.Tensor:
        """Least-squares ``g = cov(y_fp, y_q) / var(y_q)`` clamped to ``[lo, hi]``, float32.

        Channels whose quantized output is constant (``var(y_q) <= 1e-12 E[y_q^2]``) keep
        ``g = 1``. The clamp guards near-dead channels where the ratio is noise; the
        least-squares shift for a clamped gain is still :meth:`shift` of that gain.
        """
        self._require_data()
        if not 0.0 < lo <= 1.0 <= hi:
            raise ValueError(f"gain bounds need 0 < lo <= 1 <= hi, got {lo}, {hi}")
        n = self.count
        mean_q, mean_fp = self.sum_q / n, self.sum_fp / n
        var_q = self.sum_qq / n - mean_q.pow(2)
        cov = self.sum_qfp / n - mean_q * mean_fp
        live = var_q > 1e-12 * (self.sum_qq / n).clamp(min=1e-300)
        g = torch.where(live, cov / var_q.clamp(min=1e-300), torch.ones_like(var_q))
        return g.clamp(lo, hi).float()

    def mse_reduction(
        self, gain: torch.Tensor | None = None, shift: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per channel ``E[(y_fp - y_q)^2] - E[(y_fp - g y_q - d)^2]``, float32 ``[C]``.

        How much the correction lowers the output MSE on the accumulated data (``>= 0``
        for the least-squares ``g``, ``d``); ``shift`` defaults to :meth:`shift` of ``gain``.
        """
        self._require_data()
        n = self.count
        g = torch.ones_like(self.sum_q) if gain is None else gain.double()
        d = self.shift(gain).double() if shift is None else shift.double()
        # E[(f - q)^2] - E[(f - g q - d)^2] expanded; the sum_ff terms cancel.
        base = -2 * self.sum_qfp / n + self.sum_qq / n
        fitted = (
            -2 * g * self.sum_qfp / n
            - 2 * d * self.sum_fp / n
            + g.pow(2) * self.sum_qq / n
            + 2 * g * d * self.sum_q / n
            + d.pow(2)
        )
        return (base - fitted).float()
