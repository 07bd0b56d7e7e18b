import math

import torch
from torch import nn

from ptq.evaluate import perplexity


class Uniform(nn.Module):
    """Predicts a uniform distribution over V tokens: perplexity must be exactly V."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor):  # type: ignore[no-untyped-def]
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_uniform_model_has_perplexity_equal_to_vocab() -> None:
    ids = torch.randint(0, 50, (1000,))
    assert math.isclose(
        perplexity(Uniform(50), ids, seqlen=100, progress=False), 50.0, rel_tol=1e-5
    )


def test_windows_do_not_overlap_and_tail_is_dropped() -> None:
    calls: list[torch.Tensor] = []

    class Spy(Uniform):
        def forward(self, input_ids: torch.Tensor):  # type: ignore[no-untyped-def]
            calls.append(input_ids)
            return super().forward(input_ids)

    ids = torch.arange(250)
    perplexity(Spy(300), ids, seqlen=100, progress=False)
    assert [c[0, 0].item() for c in calls] == [0, 100]
