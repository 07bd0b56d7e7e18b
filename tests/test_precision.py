"""Evaluation precision: 16-bit models and LayerCast (16-bit storage, fp32 compute)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from ptq.errors import PtqUsageError
from ptq.precision import cast_model, eval_dtype

IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plain_cast_runs_entirely_in_the_dtype(
    tiny_lm: Callable[..., Any], dtype: torch.dtype
) -> None:
    model = cast_model(tiny_lm(), dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert logits.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layercast_is_fp32_compute_on_16bit_rounded_weights(
    tiny_lm: Callable[..., Any], dtype: torch.dtype
) -> None:
    lc = cast_model(tiny_lm(seed=3, random_norms=True), dtype, layercast=True)
    # the reference: an fp32 model whose weights went through the 16-bit dtype once
    ref = tiny_lm(seed=3, random_norms=True)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(dtype).float())
        expected = ref(input_ids=IDS).logits
        got = lc(input_ids=IDS).logits
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    # storage stays 16-bit, and the 16-bit copy differs from the fp32 weights
    stored = {p.dtype for p in lc.parameters()}
    assert stored == {dtype}
    plain = cast_model(tiny_lm(seed=3, random_norms=True), dtype)
    with torch.no_grad():
        assert not torch.equal(plain(input_ids=IDS).logits.float(), got)


def test_layercast_keeps_tied_weights_tied(tiny_lm: Callable[..., Any]) -> None:
    model = cast_model(tiny_lm(tie_word_embeddings=True), torch.bfloat16, layercast=True)
    emb = model.model.embed_tokens.parametrizations.weight.original
    head = model.lm_head.parametrizations.weight.original
    assert emb is head
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in tiny_lm(tie_word_embeddings=True).parameters()
    )


def test_fp32_layercast_changes_nothing(tiny_lm: Callable[..., Any]) -> None:
    a, b = tiny_lm(), cast_model(tiny_lm(), torch.float32, layercast=True)
    with torch.no_grad():
        assert torch.equal(a(input_ids=IDS).logits, b(input_ids=IDS).logits)


def test_dtype_names() -> None:
    assert eval_dtype("bf16") is torch.bfloat16
    with pytest.raises(PtqUsageError, match="fp32, bf16, fp16"):
        eval_dtype("fp8")
