"""KV-cache generation equals full-sequence greedy generation, token for token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ptq.api import quantize
from ptq.exporters.onnx import export_onnx, run_onnx
from ptq.exporters.onnx.runtime import forward, greedy_generate, make_session


def _torch_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_kv_cache_generation_matches_full_sequence(tiny_llama: Path, tmp_path: Path) -> None:
    model = quantize(tiny_llama, "w8a8", progress=False, log=lambda *_: None).model
    kv = make_session(export_onnx(model, tmp_path / "kv.onnx", accuracy_level=0))
    full = make_session(
        export_onnx(model, tmp_path / "full.onnx", accuracy_level=0, kv_cache=False)
    )
    assert not any(i.name.startswith("past") for i in full.get_inputs())
    prompt = [5, 17, 42, 8, 99, 3]
    n = 20
    with_cache = greedy_generate(kv, prompt, n)
    without = greedy_generate(full, prompt, n)
    assert len(with_cache) == n
    assert with_cache == without == _torch_greedy(model, prompt, n)


def test_cache_logits_match_full_logits(tiny_llama: Path, tmp_path: Path) -> None:
    model = quantize(tiny_llama, "w4a16", progress=False, log=lambda *_: None).model
    session = make_session(export_onnx(model, tmp_path / "m.onnx", accuracy_level=0))
    ids = np.random.default_rng(0).integers(0, 300, size=(1, 16))
    full, _ = forward(session, ids)
    _, past = forward(session, ids[:, :10])
    assert past["past_key_values.0.key"].shape == (1, 2, 10, 16)
    step, past = forward(session, ids[:, 10:], past)
    assert past["past_key_values.1.value"].shape == (1, 2, 16, 16)
    assert np.abs(step - full[:, 10:]).max() <= 1e-4


def test_run_onnx_decodes_text(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    quantize(tiny_llama, "w4a16", output=out, progress=False, log=lambda *_: None)
    path = export_onnx(out, out / "model.onnx")
    text = run_onnx(path, out, "the king and the queen", max_new_tokens=8)
    assert isinstance(text, str) and len(text) > 0
