"""Real SmolLM2-135M: ORT (MatMulNBits, fp32 activations) vs the emulation; KV generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ptq.api import quantize
from ptq.exporters.onnx import export_onnx
from ptq.exporters.onnx.runtime import forward, greedy_generate, make_session


@pytest.mark.slow
def test_smollm2_w4a16_parity_and_generation(tmp_path: Path) -> None:
    from ptq.models.source import resolve_model

    model = quantize(resolve_model("default"), "w4a16", progress=False, log=lambda *_: None).model
    path = export_onnx(model, tmp_path / "m.onnx", accuracy_level=0)
    session = make_session(path)
    ids = torch.randint(0, 40000, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    out, _ = forward(session, ids.numpy())
    # logits of magnitude ~10-30; fp32 summation order differs across 30 blocks
    assert np.abs(out - ref).max() <= 2e-3
    assert (out.argmax(-1) == ref.argmax(-1)).mean() == 1.0
    prompt = ids[0, :16].tolist()
    new = greedy_generate(session, prompt, 12)
    full = make_session(export_onnx(model, tmp_path / "f.onnx", accuracy_level=0, kv_cache=False))
    assert new == greedy_generate(full, prompt, 12)
