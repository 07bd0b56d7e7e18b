"""L-Mul in a model: every linear layer goes through lmul_linear, nothing else does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from ptq.lmul import LMulModel
from ptq.precision import cast_model

IDS = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(0))


def test_every_linear_layer_and_only_those_use_lmul(
    tiny_lm: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import ptq.lmul.mode as mode

    shapes: list[tuple[int, ...]] = []
    real = mode.lmul_linear

    def spy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        shapes.append(tuple(w.shape))
        return real(x, w, b)

    monkeypatch.setattr(mode, "lmul_linear", spy)
    model = cast_model(tiny_lm(), torch.bfloat16)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    with torch.no_grad():
        LMulModel(model)(input_ids=IDS)
    assert len(shapes) == n_linear == 2 * 7 + 1  # q k v o gate up down per block + head


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lmul_model_is_close_to_but_not_exact_multiplication(
    tiny_lm: Callable[..., Any], dtype: torch.dtype
) -> None:
    exact = cast_model(tiny_lm(seed=1), dtype)
    approx = LMulModel(cast_model(tiny_lm(seed=1), dtype))
    with torch.no_grad():
        a = exact(input_ids=IDS).logits.float()
        b = approx(input_ids=IDS).logits.float()
    rel = float((a - b).norm() / a.norm())
    assert 1e-3 < rel < 0.2
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
