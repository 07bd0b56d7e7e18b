"""ZeroQuant-FP M1/M2: power-of-two scales make the FP4 -> FP8 E4M3 cast exact."""

from __future__ import annotations

import pytest
import torch

from ptq.formats import FP4_E2M1, FP8_E4M3, PerGroup, QuantFormat, dequantize, fake_quantize
from ptq.passes.zeroquant_fp import (
    Variant,
    ZeroQuantFPPass,
    min_exact_exponent,
    zeroquant_fp_quantize,
)
from ptq.pipeline import PassContext, QuantState
from ptq.plan import build_plan
from ptq.qlinear import QuantLinear
from ptq.scheme import Scheme


def _weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 256, generator=g) * torch.rand(48, 1, generator=g)
    w[:, :32] *= 1e-4  # a group far below the row maximum (hits the 2^-8 clamp)
    w[3, 7] = 40.0  # an outlier row
    return w


def _exact_in_e4m3(x: torch.Tensor) -> bool:
    return torch.equal(x.to(torch.float8_e4m3fn).float(), x)


@pytest.mark.parametrize(("variant", "group"), [("m1", None), ("m1", 32), ("m2", 32), ("m2", 64)])
def test_exact_cast_property(variant: Variant, group: int | None) -> None:
    res = zeroquant_fp_quantize(_weight(), variant, group)
    ratio = res.weight / res.channel_scale
    assert _exact_in_e4m3(ratio)
    assert bool((res.group_scale <= 1.0).all())
    assert bool((res.group_scale >= 2.0**-8).all())
    assert torch.equal(torch.log2(res.group_scale).round().exp2(), res.group_scale)  # pow2
    # the QTensor is the formats engine's representation of the same weight, bit for bit
    assert torch.equal(dequantize(res.qtensor), res.weight)


def test_m1_channel_scale_is_power_of_two() -> None:
    res = zeroquant_fp_quantize(_weight(), "m1")
    c = res.channel_scale
    assert torch.equal(torch.log2(c).round().exp2(), c)
    assert torch.equal(res.group_scale, torch.ones_like(res.group_scale))


def test_m2_matches_formats_engine_without_clamp_and_beats_m1() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=g)
    fmt = QuantFormat(FP4_E2M1, PerGroup(32), scale_format="pow2", channel_scale=True)
    m2 = zeroquant_fp_quantize(w, "m2", 32)
    assert torch.equal(m2.weight, fake_quantize(w, fmt))
    m1 = zeroquant_fp_quantize(w, "m1")
    assert (m2.weight - w).pow(2).sum() < (m1.weight - w).pow(2).sum()


def test_min_exact_exponent_e2m1_to_e4m3() -> None:
    assert min_exact_exponent(FP4_E2M1, FP8_E4M3) == -8
    with pytest.raises(ValueError, match="mantissa"):
        min_exact_exponent(FP8_E4M3, FP4_E2M1)


def test_argument_errors() -> None:
    w = torch.randn(4, 48)
    with pytest.raises(ValueError, match="needs a group size"):
        zeroquant_fp_quantize(w, "m2")
    with pytest.raises(ValueError, match="does not divide"):
        zeroquant_fp_quantize(w, "m2", 32)
    with pytest.raises(ValueError, match="variant"):
        zeroquant_fp_quantize(w, "m3")


def test_pass_quantizes_planned_layers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    fmt = QuantFormat(FP4_E2M1, PerGroup(32), scale_format="pow2", channel_scale=True)
    plan = build_plan(model, Scheme(name="fp4", weight=fmt, ignore=()))
    ZeroQuantFPPass().run(QuantState(model=model, plan=plan), PassContext(progress=False))
    layer = model[0]
    assert isinstance(layer, QuantLinear)
    assert layer.qweight.channel_scale is not None
    assert _exact_in_e4m3(layer.weight / layer.qweight.channel_scale)
