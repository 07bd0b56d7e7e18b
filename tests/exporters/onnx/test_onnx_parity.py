"""ORT logits of the exported graph vs the PyTorch emulation, for every scheme.

Tolerances: with fp32 activations in the weight op (``accuracy_level=0``, or ``dq`` with
ORT's DQ->MatMulNBits fusion pinned to level 0) the graph computes the emulation's
numbers up to fp32 summation order: max |diff| <= 1e-4 on logits of size ~1. With
``accuracy_level=4`` ORT quantizes activations to int8 per block inside MatMulNBits
(not part of the emulation), so the bound is 5e-2 and top-1 must still agree fully.
W8A8 (``MatMulInteger`` by default, or QDQ) has no such runtime quantization: both
forms must meet 1e-4 (integer sums are exact; only the fp32 rescaling order differs).
Schemes cover the ``full_range`` scale rule (negative scales) and GPTQ (act-order,
static groups) weights.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from ptq.api import CalibrationConfig, quantize
from ptq.exporters.onnx import export_onnx
from ptq.exporters.onnx.runtime import forward, make_session
from ptq.formats import INT4, INT8, PerChannel, PerGroup, QuantFormat
from ptq.passes.gptq import GPTQPass
from ptq.qlinear import QuantLinear
from ptq.scheme import Scheme, get_scheme

EXACT_TOL = 1e-4
INT8_ACT_TOL = 5e-2
SCHEMES = [
    "w4a16",
    "w8a16",
    "w8a8",
    "fp8",
    "lorc",
    "w4a16_full_range",
    "w8a8_full_range",
    "gptq",
    "gptq_full_range",
]
FULL_RANGE_G64 = QuantFormat(INT4, PerGroup(64), scale_format="fp16", scale_rule="full_range")


def _scheme(scheme: str) -> Scheme:
    if scheme in ("w4a16_full_range", "gptq_full_range"):
        return get_scheme("w4a16").with_overrides(weight=FULL_RANGE_G64)
    if scheme == "w8a8_full_range":
        fmt = QuantFormat(INT8, PerChannel(), scale_rule="full_range")
        return get_scheme("w8a8").with_overrides(weight=fmt)
    return get_scheme({"lorc": "w4a16", "gptq": "w4a16"}.get(scheme, scheme))


@functools.lru_cache(maxsize=12)
def _model(tiny_llama: Path, scheme: str) -> Any:
    pipeline = [GPTQPass()] if scheme.startswith("gptq") else None
    model: Any = quantize(
        tiny_llama,
        _scheme(scheme),
        pipeline=pipeline,
        calibration=CalibrationConfig(samples=6, seqlen=32),
        progress=False,
        log=lambda *_: None,
    ).model
    if scheme == "lorc":
        layer = model.model.layers[0].mlp.down_proj
        assert isinstance(layer, QuantLinear)
        gen = torch.Generator().manual_seed(3)
        layer.set_lorc(
            0.05 * torch.randn(layer.out_features, 8, generator=gen),
            0.05 * torch.randn(8, layer.in_features, generator=gen),
        )
    return model


def _compare(model: nn.Module, session: object, ids: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    out, _ = forward(session, ids.numpy())
    return float(np.abs(out - ref).max()), float((out.argmax(-1) == ref.argmax(-1)).mean())


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_ort_matches_emulation(
    tiny_llama: Path, tmp_path: Path, ids: torch.Tensor, scheme: str
) -> None:
    model = _model(tiny_llama, scheme)
    exact = export_onnx(model, tmp_path / "a0.onnx", accuracy_level=0)
    diff, top1 = _compare(model, make_session(exact), ids)
    assert diff <= EXACT_TOL and top1 == 1.0, (diff, top1)
    fast = export_onnx(model, tmp_path / "a4.onnx", accuracy_level=4)
    diff, top1 = _compare(model, make_session(fast), ids)
    assert diff <= INT8_ACT_TOL and top1 == 1.0, (diff, top1)
    dq = export_onnx(model, tmp_path / "dq.onnx", weight_op="dq")
    diff, top1 = _compare(model, make_session(dq, dq_accuracy_level=0), ids)
    assert diff <= EXACT_TOL and top1 == 1.0, (diff, top1)
    if "w8a8" in scheme:
        qdq = export_onnx(model, tmp_path / "qdq.onnx", int8_matmul="qdq")
        diff, top1 = _compare(model, make_session(qdq), ids)
        assert diff <= EXACT_TOL and top1 == 1.0, (diff, top1)


def test_graph_ops_per_scheme(tiny_llama: Path, tmp_path: Path) -> None:
    def ops(scheme: str, **kw: Any) -> set[str]:
        tag = "_".join(str(v) for v in kw.values())
        path = export_onnx(_model(tiny_llama, scheme), tmp_path / f"{scheme}{tag}.onnx", **kw)
        model = onnx.load(str(path))
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        return {n.op_type for n in model.graph.node}

    w4 = ops("w4a16")
    assert "MatMulNBits" in w4 and "QuantizeLinear" not in w4
    w4dq = ops("w4a16", weight_op="dq")
    assert "MatMulNBits" not in w4dq and "DequantizeLinear" in w4dq
    w8a8 = ops("w8a8")
    assert {"QuantizeLinear", "MatMulInteger", "ReduceMax"} <= w8a8
    assert "DequantizeLinear" not in w8a8
    w8a8_qdq = ops("w8a8", int8_matmul="qdq")
    assert {"QuantizeLinear", "DequantizeLinear", "ReduceMax"} <= w8a8_qdq
    assert "MatMulInteger" not in w8a8_qdq
    model = onnx.load(str(tmp_path / "w8a8.onnx"))
    count = {
        t: sum(n.op_type == t for n in model.graph.node)
        for t in ("MatMulInteger", "QuantizeLinear")
    }
    # 14 linears; q/k/v and gate/up share their input's quantization: 4 per block
    assert count == {"MatMulInteger": 14, "QuantizeLinear": 8}
    model = onnx.load(str(tmp_path / "w4a16.onnx"))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 14
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 64 and attrs["accuracy_level"] == 4


def test_fp_model_and_unsupported_arch(tiny_llama: Path, tmp_path: Path, ids: torch.Tensor) -> None:
    from ptq.errors import PtqUsageError
    from ptq.models.source import load_fp_model, resolve_model

    fp: Any
    fp, _ = load_fp_model(resolve_model(str(tiny_llama)))
    path = export_onnx(tiny_llama, tmp_path / "fp")
    assert path == tmp_path / "fp" / "model.onnx" and (tmp_path / "fp" / "tokenizer.json").is_file()
    diff, top1 = _compare(fp, make_session(path), ids)
    assert diff <= EXACT_TOL and top1 == 1.0
    with pytest.raises(PtqUsageError, match="weight_op"):
        export_onnx(fp, tmp_path / "y.onnx", weight_op="bogus")


@pytest.mark.parametrize(
    ("arch", "why"),
    [
        ("phi3", r"block 0: fused q/k/v projection model\.layers\.0\.self_attn\.qkv_proj"),
        ("qwen3", r"keys through model\.layers\.0\.self_attn\.k_norm \(a key norm\)"),
        ("mixtral", r"router model\.layers\.0\.mlp\.gate"),
        ("gpt2", "rms_norm_eps"),
    ],
)
def test_structures_the_exporter_cannot_write_are_named(
    arch: str, why: str, tmp_path: Path
) -> None:
    from tiny_archs import tiny_model

    from ptq.errors import PtqUsageError
    from ptq.frontend.experts import unfuse_experts

    model = tiny_model(arch)
    unfuse_experts(model)
    with pytest.raises(PtqUsageError, match=why):
        export_onnx(model, tmp_path / "x.onnx")


def test_mse_clipped_scheme_exports(tiny_llama: Path, tmp_path: Path, ids: torch.Tensor) -> None:
    from ptq.formats import INT4, PerGroup, QuantFormat

    scheme = Scheme(name="w4-mse", weight=QuantFormat(INT4, PerGroup(64), clip="mse"))
    model = quantize(tiny_llama, scheme, progress=False, log=lambda *_: None).model
    path = export_onnx(model, tmp_path / "m.onnx", accuracy_level=0)
    diff, top1 = _compare(model, make_session(path), ids)
    assert diff <= EXACT_TOL and top1 == 1.0
