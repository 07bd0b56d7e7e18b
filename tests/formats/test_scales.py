"""Scale encodings against ml_dtypes and exact power-of-two rules."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from ptq.formats.scales import (
    UE5M3,
    e8m0_decode,
    e8m0_encode,
    encode_scale,
    pow2_exponent,
    scale_from_bytes,
    scale_to_bytes,
)


def test_e8m0_every_code_matches_ml_dtypes() -> None:
    codes = np.arange(256, dtype=np.uint8)
    oracle = torch.from_numpy(codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32))
    ours = e8m0_decode(torch.from_numpy(codes))
    assert (
        torch.equal(ours[:255], oracle[:255])
        and torch.isnan(ours[255])
        and torch.isnan(oracle[255])
    )
    assert torch.equal(e8m0_encode(ours[:255]), torch.from_numpy(codes[:255]))


@pytest.mark.parametrize("fmt", ["e8m0", "e4m3", "ue5m3", "pow2"])
def test_scale_bytes_round_trip(fmt: str) -> None:
    s = encode_scale(torch.logspace(-5, 4, 300, base=2.0), fmt)  # type: ignore[arg-type]
    assert torch.equal(scale_from_bytes(scale_to_bytes(s, fmt), fmt), s)  # type: ignore[arg-type]


def test_pow2_exponent_is_exact_at_power_boundaries() -> None:
    just_above = torch.nextafter(torch.tensor([1024.0]), torch.tensor([2048.0]))
    assert int(pow2_exponent(just_above, round_up=True)) == 11  # log2 would round to 10
    assert int(pow2_exponent(torch.tensor([1024.0]), round_up=True)) == 10
    assert int(pow2_exponent(just_above, round_up=False)) == 10


def test_encode_scale_grids() -> None:
    s = torch.tensor([3.0, 1e-12, 1e6])
    assert encode_scale(s, "e8m0").tolist() == [2.0, 2.0**-40, 2.0**19]
    assert encode_scale(s, "e8m0", round_up=True).tolist() == [4.0, 2.0**-39, 2.0**20]
    e4 = encode_scale(s, "e4m3")
    assert e4.tolist() == [3.0, 2.0**-9, 448.0]  # clamped to (0, 448]
    assert encode_scale(torch.tensor([1e9]), "ue5m3").item() == UE5M3.max_value
    assert encode_scale(torch.tensor([1e9]), "fp16").item() == 65504.0
    with pytest.raises(ValueError, match="unknown scale format"):
        encode_scale(s, "fp12")  # type: ignore[arg-type]
