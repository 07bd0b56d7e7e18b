"""The reproducibility report sees differences, and attributes them to batch or threads."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from ptq.reproducibility import Setting, format_table, measure_settings, summarize


class BatchSensitive(nn.Module):
    """Logits that change by 1e-3 * batch size, and by 1e-4 * thread count."""

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        b, t = input_ids.shape
        logits = torch.zeros(b, t, 10)
        logits[..., 0] = 1e-3 * b + 1e-4 * torch.get_num_threads()
        return SimpleNamespace(logits=logits)


def test_differences_are_measured_and_attributed() -> None:
    ids = torch.randint(1, 10, (16 * 8,), generator=torch.Generator().manual_seed(0))
    lp = measure_settings(BatchSensitive(), ids, seqlen=8, batch_sizes=(1, 4, 16), threads=(1, 2))
    assert sorted(lp) == [Setting(b, t) for b in (1, 4, 16) for t in (1, 2)]
    row = summarize("bf16", False, lp)
    # target token 0 never occurs (ids >= 1), so dlogp = d(log Z) for a logit shift of
    # 15e-3 (batch) and 1e-4 (threads) on one of 10 classes: about 1/10 of the shift
    assert 1e-3 < row.max_diff_batch < 2e-3
    assert 5e-6 < row.max_diff_threads < 2e-5
    assert row.max_diff >= row.max_diff_batch and row.tokens_changed == 1.0
    assert row.ppl_spread > 0
    assert "| bf16 | no |" in format_table([row])


def test_identical_settings_report_zero() -> None:
    class Fixed(BatchSensitive):
        def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 10))

    ids = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    row = summarize(
        "fp32", False, measure_settings(Fixed(), ids, seqlen=8, batch_sizes=(1, 4), threads=(1, 2))
    )
    assert row.max_diff == 0 and row.ppl_spread == 0 and row.tokens_changed == 0
