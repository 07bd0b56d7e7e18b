import pytest
import torch

from ptq.activation import _round, fake_quantize_activation
from ptq.formats import FP8_E4M3, FP8_E5M2, INT8
from ptq.formats.minifloat import round_to_float_grid
from ptq.scheme import ActivationScheme


@pytest.mark.parametrize("fmt", [FP8_E4M3, FP8_E5M2])
def test_native_fp8_path_equals_the_reference_rounding(fmt) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-12, 6, 4096)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e9, -1e9, fmt.max_value * 1.01])])
    assert torch.equal(_round(x, fmt), round_to_float_grid(x, fmt))


def test_dynamic_per_token_scales_each_row_to_its_amax() -> None:
    act = ActivationScheme(element=INT8)
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 3.0, -50.0]])
    y = fake_quantize_activation(x, act)
    # row amax maps to 127 exactly, so it survives the round trip
    assert y[0, 1] == -2.0 and y[1, 0] == 100.0
    assert torch.allclose(y, x, atol=100 / 127)


def test_static_needs_a_scale_and_asymmetric_keeps_range() -> None:
    static = ActivationScheme(element=FP8_E4M3, granularity="tensor", dynamic=False)
    with pytest.raises(ValueError, match="calibrated scale"):
        fake_quantize_activation(torch.ones(2, 2), static)
    y = fake_quantize_activation(torch.ones(2, 2) * 3, static, torch.tensor(1.0))
    assert torch.equal(y, torch.full((2, 2), 3.0))
    asym = ActivationScheme(element=INT8, symmetric=False)
    x = torch.linspace(0, 10, 50).reshape(2, 25)
    assert torch.allclose(fake_quantize_activation(x, asym), x, atol=10 / 255)
