"""Layer-wise passes on convs and encoders: im2col rows, tiny CNN, tiny BERT, GPT-2 Conv1D."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from ptq.calibration.layer_inputs import geometry, input_rows, rows_forward, weight_2d
from ptq.formats import INT3, PerChannel, QuantFormat
from ptq.frontend.fold import fold_conv_bn
from ptq.frontend.qconv import QuantConv2d
from ptq.passes.adaptive import AdaQuantPass, AdaQuantPassConfig, AdaRoundPass, AdaRoundPassConfig
from ptq.passes.gptq import GPTQPass
from ptq.passes.rtn import RTNPass
from ptq.pipeline import Pass, PassContext, Pipeline, QuantState
from ptq.plan import LayerPlan, QuantPlan
from ptq.qlinear import QuantLinear
from ptq.scheme import Scheme

FMT = QuantFormat(INT3, PerChannel())


class SamePadConv(nn.Conv2d):
    """TensorFlow-style "same" conv: pads (more at the end) inside forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [0, 1, 0, 1]), self.weight, self.bias, self.stride, 0)


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = SamePadConv(16, 32, 2, stride=2)
        self.bn2 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc = nn.Linear(32, 10)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(pixel_values)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.dw(x))
        out: torch.Tensor = self.fc(x.mean((2, 3)))
        return out


def _tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN()
    for bn in (model.bn1, model.bn2):
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    model.conv1 = fold_conv_bn(model.conv1, model.bn1)
    model.conv2 = fold_conv_bn(model.conv2, model.bn2)  # type: ignore[assignment]
    model.bn1, model.bn2 = nn.Identity(), nn.Identity()  # type: ignore[assignment]
    return model


def _plan(model: nn.Module, names: list[str]) -> QuantPlan:
    plan = QuantPlan(scheme=Scheme(name="w3", weight=FMT, activation=None))
    for name in names:
        geo = geometry(model.get_submodule(name))
        plan.layers[name] = LayerPlan(
            name=name,
            in_features=geo.in_features,
            out_features=geo.out_features,
            weight=FMT,
            activation=None,
        )
    return plan


def _output_error(
    build: Callable[[], nn.Module],
    names: list[str],
    quant_pass: Pass,
    calibration: Any,
    evaluate: Callable[[nn.Module], torch.Tensor],
) -> float:
    ref = evaluate(build())
    model = build()
    ctx = PassContext(calibration=calibration, progress=False)  # list of dicts: see runner
    Pipeline([quant_pass]).run(QuantState(model=model, plan=_plan(model, names)), ctx)
    return float((evaluate(model) - ref).pow(2).mean() / ref.pow(2).mean())


METHODS = [
    pytest.param(GPTQPass, id="gptq"),
    pytest.param(
        lambda: AdaRoundPass(AdaRoundPassConfig(iterations=200, input_rows=1024)),
        id="adaround",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        lambda: AdaQuantPass(AdaQuantPassConfig(iterations=200, input_rows=1024)),
        id="adaquant",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("conv", [SamePadConv(6, 8, 2, stride=2), nn.Conv2d(8, 8, 3, groups=4)])
def test_im2col_rows_reproduce_the_conv(conv: nn.Conv2d) -> None:
    x = torch.randn(2, conv.in_channels, 7, 7)
    with torch.no_grad():
        y = conv(x)
        rows = input_rows(conv, x, y)
        flat = rows_forward(weight_2d(conv), conv.bias, rows, conv.groups)
    expect = y.permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    torch.testing.assert_close(flat, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", METHODS)
def test_cnn_layerwise_beats_rtn(make: Callable[[], Pass]) -> None:
    gen = torch.Generator().manual_seed(1)
    cal = [{"pixel_values": torch.randn(4, 3, 12, 12, generator=gen)} for _ in range(4)]
    held_out = torch.randn(16, 3, 12, 12, generator=gen)
    names = ["conv1", "conv2", "dw", "fc"]

    def evaluate(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = m(held_out)
        return out

    rtn = _output_error(_tiny_cnn, names, RTNPass(), cal, evaluate)
    model = _tiny_cnn()
    Pipeline([GPTQPass()]).run(
        QuantState(model=model, plan=_plan(model, names)),
        PassContext(calibration=cal, progress=False),  # type: ignore[arg-type]
    )
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.conv2, QuantConv2d)
    assert isinstance(model.conv2.conv, SamePadConv) and isinstance(model.fc, QuantLinear)
    err = _output_error(_tiny_cnn, names, make(), cal, evaluate)
    assert err < rtn, f"{err:.3e} vs RTN {rtn:.3e}"


def _tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=120,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


@pytest.mark.parametrize("make", METHODS)
def test_bert_encoder_layerwise_beats_rtn(make: Callable[[], Pass]) -> None:
    gen = torch.Generator().manual_seed(2)

    def batch(n: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, 120, (n, 24), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, 16:] = 0  # one padded sequence
        return {"input_ids": ids, "attention_mask": mask}

    cal = [batch(4) for _ in range(4)]
    held_out = batch(8)
    names = [n for n, m in _tiny_bert().named_modules() if isinstance(m, nn.Linear)]

    def evaluate(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = m(**held_out).last_hidden_state
        return out

    rtn = _output_error(_tiny_bert, names, RTNPass(), cal, evaluate)
    err = _output_error(_tiny_bert, names, make(), cal, evaluate)
    assert err < rtn, f"{err:.3e} vs RTN {rtn:.3e}"


def _tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg).eval()


def test_gpt2_conv1d_gptq_beats_rtn() -> None:
    cal = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(3))
    held_out = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(4))
    names = [n for n, m in _tiny_gpt2().transformer.h.named_modules() if hasattr(m, "nf")]
    names = [f"transformer.h.{n}" for n in names]

    def evaluate(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = m(held_out).logits
        return out

    rtn = _output_error(_tiny_gpt2, names, RTNPass(), cal, evaluate)
    gptq = _output_error(_tiny_gpt2, names, GPTQPass(), cal, evaluate)
    assert gptq < rtn
