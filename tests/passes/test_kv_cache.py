"""KV-cache quantization: calibrated per-layer k/v scales, fake-quantized projections."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import LlamaForCausalLM

from ptq.passes.kv_cache import (
    KVCacheConfig,
    KVCachePass,
    KVDtype,
    kv_cache_scales,
    rope_pair_absmax,
)
from ptq.passes.rtn import RTNPass
from ptq.pipeline import PassContext, Pipeline, QuantState
from ptq.plan import build_plan
from ptq.scheme import get_scheme


def test_rope_pair_bound_covers_any_rotation() -> None:
    k = torch.randn(100, 2 * 16)  # two heads of dim 16
    bound = rope_pair_absmax(k, 16)
    theta = torch.rand(100, 2, 8) * 6.3
    pairs = k.reshape(100, 2, 2, 8)
    a, b = pairs[:, :, 0], pairs[:, :, 1]
    rot = torch.stack((a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()), 2)
    assert rot.abs().max() <= bound + 1e-6
    assert bound >= k.abs().max()


@pytest.mark.parametrize("dtype", ["fp8_e4m3", "int8"])
def test_scales_exported_and_outputs_on_grid(
    dtype: KVDtype, tiny_lm: Callable[[], LlamaForCausalLM]
) -> None:
    model = tiny_lm()
    cal = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(0))
    plan = build_plan(model, get_scheme("w8a8"))
    ctx = PassContext(calibration=cal, progress=False)
    Pipeline([RTNPass(), KVCachePass(KVCacheConfig(dtype=dtype))]).run(
        QuantState(model=model, plan=plan), ctx
    )
    scales = kv_cache_scales(model)
    assert set(scales) == {
        f"model.layers.{i}.self_attn.{kv}_scale" for i in range(2) for kv in "kv"
    }
    assert all(s.shape == (1,) and float(s) > 0 for s in scales.values())
    attn = model.model.layers[1].self_attn
    x = torch.randn(3, 64)
    for proj, key in ((attn.k_proj, "k"), (attn.v_proj, "v")):
        y = proj(x) / scales[f"model.layers.1.self_attn.{key}_scale"]
        if dtype == "int8":
            assert torch.allclose(y, y.round(), atol=1e-4) and y.abs().max() <= 127 + 1e-4
        else:
            assert torch.allclose(y.to(torch.float8_e4m3fn).float(), y, atol=1e-5)
    assert torch.isfinite(model(input_ids=cal[:1]).logits).all()
    with pytest.raises(ValueError, match="already has KV-cache"):
        KVCachePass().run(QuantState(model=model, plan=plan), ctx)
