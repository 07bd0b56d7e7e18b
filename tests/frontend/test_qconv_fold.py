"""QuantConv2d emulation, HF Conv1D quantization and conv-BN folding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptq.formats import FP8_E4M3, INT4, INT8, PerChannel, PerGroup, QuantFormat, fake_quantize
from ptq.frontend.fold import fold_all_conv_bn, fold_conv_bn
from ptq.frontend.qconv import QuantConv2d, conv_activation, quantize_conv_module
from ptq.qlinear import QuantLinear
from ptq.scheme import ActivationScheme


def test_quant_conv_matches_fake_quantized_weight() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=2)
    fmt = QuantFormat(INT4, PerGroup(12))  # K = 8/2 * 9 = 36
    q = quantize_conv_module(conv, fmt)
    assert isinstance(q, QuantConv2d)
    w_fq = fake_quantize(conv.weight.detach().reshape(6, 36), fmt).reshape(conv.weight.shape)
    x = torch.randn(2, 8, 5, 5)
    ref = nn.functional.conv2d(x, w_fq, conv.bias, padding=1, groups=2)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=0)
    assert not torch.equal(conv.weight, q.weight)  # the float conv is left untouched


def test_quant_conv_activation_is_per_tensor() -> None:
    act = ActivationScheme(element=INT8)  # per-token request
    assert conv_activation(act) == ActivationScheme(element=INT8, granularity="tensor")
    conv = nn.Conv1d(4, 4, 3)
    q = quantize_conv_module(conv, QuantFormat(INT8, PerChannel()), act)
    x = torch.randn(1, 4, 10)
    s = x.abs().amax() / 127
    xq = torch.clamp(torch.round(x / s), -127, 127) * s
    assert isinstance(q, QuantConv2d)
    expected = nn.functional.conv1d(xq, q.weight, conv.bias)
    torch.testing.assert_close(q(x), expected, rtol=1e-6, atol=1e-6)


def test_hf_conv1d_becomes_quant_linear() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    conv = Conv1D(12, 16)
    fmt = QuantFormat(FP8_E4M3, PerChannel())
    q = quantize_conv_module(conv, fmt)
    assert isinstance(q, QuantLinear)
    x = torch.randn(3, 16)
    w_fq = fake_quantize(conv.weight.detach().t().contiguous(), fmt)
    torch.testing.assert_close(q(x), x @ w_fq.t() + conv.bias, rtol=1e-6, atol=1e-6)


def test_quantize_conv_module_rejects_other_modules() -> None:
    with pytest.raises(ValueError, match="not Linear"):
        quantize_conv_module(nn.Linear(2, 2), QuantFormat(INT8, PerChannel()))


def _random_bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


def test_fold_conv_bn_equals_conv_then_bn() -> None:
    torch.manual_seed(2)
    conv, bn = nn.Conv2d(3, 5, 3, bias=False), _random_bn(5)
    folded = fold_conv_bn(conv, bn)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="output channels"):
        fold_conv_bn(conv, _random_bn(4))


def test_fold_all_needs_eval_mode() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="eval"):
        fold_all_conv_bn(model, (torch.randn(1, 3, 4, 4),))


def test_fold_all_skips_shared_conv_output() -> None:
    class TwoUsers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), _random_bn(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), _random_bn(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y + self.bn2(self.conv2(y))

    model = TwoUsers().eval()
    x = torch.randn(1, 3, 4, 4)
    ref = model(x)
    assert fold_all_conv_bn(model, (x,)) == [("conv2", "bn2")]
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
