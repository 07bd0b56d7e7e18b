"""Reloading ptq outputs into the emulated model."""

from __future__ import annotations

from pathlib import Path

from ptq.models.quantized_loader import load_quantized_model


def test_kv_cache_outputs_reload_with_their_scales(tiny_llama: Path, tmp_path: Path) -> None:
    """k_scale/v_scale (what vLLM reads) come back as the KV-cache fake quantization."""
    import torch

    from ptq.api import quantize as run
    from ptq.compose import build_passes
    from ptq.passes.kv_cache import KVFakeQuant, kv_cache_scales
    from ptq.scheme import get_scheme

    scheme = get_scheme("w4a16")
    out = tmp_path / "kv"
    quiet = {"progress": False, "log": lambda *_: None}
    run(tiny_llama, scheme, output=out, pipeline=build_passes(scheme, kv_cache="fp8_e4m3"), **quiet)
    # the same run kept in memory: the emulation the output must reload to
    result = run(tiny_llama, scheme, pipeline=build_passes(scheme, kv_cache="fp8_e4m3"), **quiet)
    assert result.model is not None
    reloaded, _ = load_quantized_model(out)
    assert sum(isinstance(m, KVFakeQuant) for m in reloaded.modules()) == 4
    assert kv_cache_scales(reloaded).keys() == kv_cache_scales(result.model).keys()
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
