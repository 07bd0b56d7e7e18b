"""Discovery on hand-built modules: fallbacks, custom F.linear layers, weight_2d layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptq.frontend.blocks import find_blocks
from ptq.frontend.capture import capture
from ptq.frontend.quantizable import QuantizableOp, discover


class CustomProj(nn.Module):
    """A layer with a weight used through F.linear: not an nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4 * 4 * 4, 8)
        self.custom = CustomProj()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(torch.relu(self.conv(x)))
        return self.custom(self.fc(h.flatten(1)))


class Opts:
    """A non-tensor forward argument: torch.export cannot take it, FX can."""

    scale = 2.0


class NeedsFx(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, opts: Opts) -> torch.Tensor:
        return self.lin(x) * opts.scale


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.custom = CustomProj()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.custom(self.lin(x))
        return x


def test_graph_discovery_and_custom_linear_is_reported() -> None:
    net = Net().eval()
    disc = discover(net, example_inputs=(torch.randn(1, 3, 4, 4),))
    assert disc.capture is not None and disc.capture.methods == {"": "export"}
    assert find_blocks(net) is None
    assert {(o.name, o.kind, o.in_features, o.out_features) for o in disc} == {
        ("conv", "conv2d", 27, 4),
        ("dw", "conv2d", 9, 4),
        ("fc", "linear", 64, 8),
    }
    assert "not quantized" in disc.skipped["custom"] and "CustomProj" in disc.skipped["custom"]
    assert disc.ops["dw"].weight_2d().shape == (4, 9)
    assert torch.equal(disc.ops["conv"].weight_2d(), net.conv.weight.reshape(4, 27))


def test_symbolic_trace_fallback_when_export_fails() -> None:
    model = NeedsFx()
    cap = capture(model, (torch.randn(2, 8), Opts()))
    assert cap.methods == {"": "symbolic_trace"}
    assert "export" in cap.graphs[0].failures[0]
    disc = discover(model, captured=cap)
    assert list(disc.ops) == ["lin"] and disc.ops["lin"].source == "symbolic_trace"


def test_symbolic_trace_graph_reports_custom_linear() -> None:
    net = Net()
    cap = capture(net, (torch.randn(1, 3, 4, 4),), methods=("symbolic_trace",))
    disc = discover(net, captured=cap)
    assert set(disc.ops) == {"conv", "dw", "fc"}
    assert "CustomProj" in disc.skipped["custom"]


def test_module_walk_fallback_when_capture_fails() -> None:
    model = DataDependent()
    disc = discover(model, example_inputs=(torch.randn(2, 8),))
    assert disc.capture is not None and set(disc.capture.failures[""][0:1])
    assert [m.split(":")[0] for m in disc.capture.failures[""]] == ["export", "symbolic_trace"]
    assert any("failed" in n for n in disc.notes)
    assert disc.ops["lin"].source == "module_walk"
    assert "capture did not reach it" in disc.skipped["custom"]


def test_hf_conv1d_weight_is_transposed() -> None:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(12, 5)  # nf=12 outputs, nx=5 inputs; weight stored [5, 12]
    model = nn.Sequential(conv)
    disc = discover(model, example_inputs=(torch.randn(2, 5),))
    op = disc.ops["0"]
    assert (op.kind, op.in_features, op.out_features, op.transposed) == ("conv1d_hf", 5, 12, True)
    assert torch.equal(op.weight_2d(), conv.weight.t())


def test_weight_2d_without_weight_raises() -> None:
    with pytest.raises(ValueError, match="has no weight"):
        QuantizableOp("attn.sdpa", "matmul", 16, 0).weight_2d()
