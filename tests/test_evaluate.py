import math
from collections.abc import Callable
from typing import Any

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


def test_batch_size_stacks_windows_and_keeps_every_token(
    tiny_lm: Callable[..., Any],
) -> None:
    from ptq.evaluate import perplexity_from_logprobs, token_logprobs

    shapes: list[tuple[int, ...]] = []
    model = tiny_lm()
    model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    ids = torch.randint(0, 320, (7 * 20 + 5,), generator=torch.Generator().manual_seed(0))
    one = token_logprobs(model, ids, seqlen=20, batch_size=1, progress=False)
    three = token_logprobs(model, ids, seqlen=20, batch_size=3, progress=False)
    assert shapes == [(1, 20)] * 7 + [(3, 20), (3, 20), (1, 20)]
    assert one.shape == three.shape == (7, 19)
    assert torch.allclose(one, three, atol=1e-5)
    ppl = perplexity(model, ids, seqlen=20, batch_size=3, progress=False)
    assert math.isclose(ppl, perplexity_from_logprobs(three), rel_tol=1e-6)
