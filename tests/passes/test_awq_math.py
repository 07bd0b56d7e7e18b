"""AWQ's maths: scale candidates, scaled fake weights, the clipping search."""

from __future__ import annotations

import pytest
import torch

from ptq.formats import fake_quantize
from ptq.formats.names import parse_format
from ptq.passes.awq_math import (
    _block_errors,
    awq_scales,
    clip_search,
    scaled_fake_weight,
    weight_magnitude,
)


def test_scales_are_normalised_and_alpha_zero_is_identity() -> None:
    x = torch.rand(64) * 10 + 0.01
    for alpha in (0.25, 0.5, 0.95):
        s = awq_scales(x, alpha)
        assert float((s.max() * s.min()).sqrt()) == pytest.approx(1.0, rel=1e-5)
        # larger activations get larger scales
        order = torch.argsort(x)
        assert bool((s[order][1:] >= s[order][:-1]).all())
    assert torch.equal(awq_scales(x, 0.0), torch.ones(64))


def test_duo_scaling_divides_by_weight_magnitude() -> None:
    x = torch.rand(32) + 0.5
    w = torch.rand(32) + 0.5
    s = awq_scales(x, 0.5, w)
    ref = x.double().sqrt() / w.double().sqrt()
    ref = (ref / (ref.max() * ref.min()).sqrt()).float()
    assert torch.allclose(s, ref, rtol=1e-6)


def test_weight_magnitude_is_relative_to_each_block() -> None:
    fmt = parse_format("int4_g4")
    w = torch.tensor([[1.0, -2.0, 4.0, 0.0, 8.0, 8.0, 8.0, 8.0]])
    m = weight_magnitude([w], fmt)
    assert torch.allclose(m, torch.tensor([0.25, 0.5, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0]))


def test_scaled_fake_weight_is_q_of_scaled_weight_unscaled() -> None:
    fmt = parse_format("int4_g8")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    s = torch.rand(32, generator=g) + 0.5
    got = scaled_fake_weight(w, s, fmt)
    assert torch.equal(got, fake_quantize(w * s, fmt) / s)
    assert torch.equal(scaled_fake_weight(w, torch.ones(32), fmt), fake_quantize(w, fmt))


def test_block_errors_sum_to_the_blockwise_output_error() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 24, generator=g)
    d = torch.randn(6, 24, generator=g)
    err = _block_errors(x, d, (2, 8))
    assert err.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            part = x[:, j * 8 : (j + 1) * 8] @ d[i * 2 : (i + 1) * 2, j * 8 : (j + 1) * 8].T
            assert float(err[i, j]) == pytest.approx(float(part.pow(2).sum()), rel=1e-4)


@pytest.mark.parametrize("name", ["int4_g16", "int3_g16_asym", "nvfp4", "fp6_e3m2_g16"])
def test_clip_search_never_increases_a_blocks_error(name: str) -> None:
    fmt = parse_format(name)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g)
    w[:, 3] *= 8  # outliers that clipping may trade away
    x = torch.randn(256, 64, generator=g)
    clipped, ratio = clip_search(w, x, fmt, grid=20, max_shrink=0.5)
    block = fmt.granularity.block_shape(*w.shape)
    before = _block_errors(x, fake_quantize(w, fmt) - w, block)
    from ptq.passes.quant_with_scales import tensor_global_scale

    gs = tensor_global_scale(w, fmt)
    after = _block_errors(x, fake_quantize(clipped, fmt, global_scale=gs) - w, block)
    assert bool((after <= before * (1 + 1e-5) + 1e-6).all())
    assert float(ratio.min()) >= 0.55 - 1e-6 and float(ratio.max()) <= 1.0
    assert bool((ratio < 1).any())  # something was clipped
    assert float(clipped.abs().max()) <= float(w.abs().max())
