"""Sensitivity estimators on a tiny random Llama: sanity, ordering, caching."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ptq.models.source import load_fp_model, resolve_model
from ptq.passes.allocation import measure as measure_mod
from ptq.passes.allocation import parse_candidates
from ptq.passes.allocation.measure import (
    ESTIMATORS,
    MeasureConfig,
    cached_sensitivity,
    candidate_weight,
    measure_sensitivity,
    model_fingerprint,
    supported,
)

CANDS = "int8_channel,int4_g32,int3_g32,int2_g32,int4_g128,fp16"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls: one thread avoids synchronisation stalls on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tiny_llama: Path) -> nn.Module:
    net, _ = load_fp_model(resolve_model(str(tiny_llama), quiet=True))
    return net.eval()


@pytest.fixture(scope="module")
def layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tables(model: nn.Module, layers: list[str], calib: torch.Tensor) -> dict[str, Any]:
    cands = parse_candidates(CANDS)
    return {
        est: measure_sensitivity(
            model, layers, cands, calib, MeasureConfig(estimator=est, samples=2, seqlen=32)
        )
        for est in ESTIMATORS
    }


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_deltas_finite_nonnegative_and_shape_aware(tables: dict[str, Any], estimator: str) -> None:
    t = tables[estimator]
    col = {c: i for i, c in enumerate(t.candidates)}
    measured = np.delete(t.loss, col["int4_g128"], axis=1)
    assert np.isfinite(measured).all() and (measured >= 0).all()
    assert np.isnan(t.loss[:, col["int4_g128"]]).all()  # 128 does not divide K = 64 / 192
    assert (t.loss[:, col["fp16"]] == 0).all()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_fewer_bits_cost_more_on_average(tables: dict[str, Any], estimator: str) -> None:
    t = tables[estimator]
    mean = {c: float(t.loss[:, i].mean()) for i, c in enumerate(t.candidates)}
    assert mean["int2_g32"] > mean["int4_g32"] > mean["int8_channel"]
    if estimator != "loss":  # the measured loss is noisy on a random model at 64 tokens
        assert mean["int3_g32"] > mean["int4_g32"]


def test_fisher_ranks_like_kl(tables: dict[str, Any]) -> None:
    """The Fisher estimate is the second-order expansion of the logits' KL."""
    a, b = tables["fisher"].loss[:, :4].ravel(), tables["kl"].loss[:, :4].ravel()
    ra, rb = (np.argsort(np.argsort(x)).astype(np.float64) for x in (a, b))
    rho = float(np.corrcoef(ra, rb)[0, 1])
    assert rho > 0.9, rho


def test_weights_restored(model: nn.Module, layers: list[str], calib: torch.Tensor) -> None:
    before = model_fingerprint(model, layers)
    measure_sensitivity(
        model, layers[:3], parse_candidates("int2_g32"), calib, MeasureConfig(estimator="loss")
    )
    assert model_fingerprint(model, layers) == before


def test_cache_reused_and_invalidated(
    model: nn.Module,
    layers: list[str],
    calib: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cands = parse_candidates("int8_channel,int4_g32,fp16")
    cfg = MeasureConfig(estimator="hessian", samples=2, seqlen=32)
    t1, path, hit = cached_sensitivity(model, layers, cands, calib, cfg, tmp_path)
    assert not hit and path is not None and path.is_file()

    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("re-measured although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(measure_mod, "measure_sensitivity", boom)
        t2, path2, hit2 = cached_sensitivity(model, layers, cands, calib, cfg, tmp_path)
    assert hit2 and path2 == path
    np.testing.assert_array_equal(t1.loss, t2.loss)
    changed = [
        (cands, MeasureConfig(estimator="fisher", samples=2, seqlen=32), calib),
        (cands, MeasureConfig(estimator="hessian", samples=1, seqlen=32), calib),
        (parse_candidates("int8_channel,int3_g32,fp16"), cfg, calib),
        (cands, cfg, calib.flip(0)),
    ]
    files = {path}
    for c, config, ids in changed:
        _, p, h = cached_sensitivity(model, layers, c, ids, config, tmp_path)
        assert not h and p not in files
        files.add(p)
    lin = model.get_submodule(layers[0])
    assert isinstance(lin, nn.Linear)
    w = lin.weight
    saved = w.data.clone()
    try:
        w.data[0, 0] += 1.0
        _, p, h = cached_sensitivity(model, layers, cands, calib, cfg, tmp_path)
        assert not h and p not in files
    finally:
        w.data.copy_(saved)


def test_corrupt_cache_is_remeasured(
    model: nn.Module, layers: list[str], calib: torch.Tensor, tmp_path: Path
) -> None:
    cands = parse_candidates("int4_g32,fp16")
    cfg = MeasureConfig(estimator="hessian", samples=2, seqlen=16)
    _, path, _ = cached_sensitivity(model, layers, cands, calib, cfg, tmp_path)
    assert path is not None
    path.write_text("{not json")
    table, _, hit = cached_sensitivity(model, layers, cands, calib, cfg, tmp_path)
    assert not hit and math.isfinite(float(table.loss[0, 0]))


def test_lorc_candidates() -> None:
    cands = parse_candidates("int3_g32+lorc4,int3_g32+lorc4@int8_channel,int3_g32+lorc4@mxfp4")
    kept, why = supported(cands)
    assert [c.name for c in kept] == ["int3_g32+lorc4", "int3_g32+lorc4@int8_channel"]
    assert len(why) == 1 and "int3_g32+lorc4@mxfp4" in why[0]
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    plain = candidate_weight(w, parse_candidates("int3_g32")[0])
    corrected = candidate_weight(w, kept[0])
    assert (w - corrected).norm() < (w - plain).norm()


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="estimator"):
        MeasureConfig(estimator="magic")
    with pytest.raises(ValueError, match="samples"):
        MeasureConfig(samples=0)
