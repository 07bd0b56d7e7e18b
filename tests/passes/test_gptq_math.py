"""GPTQ maths: beats RTN on correlated inputs, exact QTensors, act-order, damping."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch

from ptq.calibration.hessian import OwnedHessian
from ptq.formats import (
    FP4_E2M1,
    FP8_E4M3,
    INT3,
    INT4,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantFormat,
    dequantize,
    fake_quantize,
    quantize,
)
from ptq.passes.gptq_math import (
    GPTQConfig,
    HessianError,
    gptq_quantize,
    inverse_hessian_cholesky,
    permute_rows_in_place,
    static_scales,
    transpose_in_place,
)

FORMATS = {
    "int4_g64": QuantFormat(INT4, PerGroup(64)),
    "int4_channel": QuantFormat(INT4, PerChannel()),
    "int3_g64": QuantFormat(INT3, PerGroup(64)),
    "nvfp4": QuantFormat(FP4_E2M1, PerGroup(16), scale_format="e4m3", global_scale=True),
    "mxfp4": QuantFormat(FP4_E2M1, PerGroup(32), scale_format="e8m0", scale_rule="mx"),
}
EXTRA = {
    "int4_g64_asym": QuantFormat(INT4, PerGroup(64), symmetric=False),
    "fp8_channel": QuantFormat(FP8_E4M3, PerChannel()),
    "int4_block16x32": QuantFormat(INT4, PerBlock(16, 32)),
    "int4_tensor": QuantFormat(INT4, PerTensor()),
    "int4_g64_mse": QuantFormat(INT4, PerGroup(64), clip="mse"),
}
MODES = {
    "dynamic": GPTQConfig(),
    "static": GPTQConfig(scale_mode="static"),
    "static_act_order": GPTQConfig(scale_mode="static", act_order=True),
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add contention on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_problem(n: int = 64, k: int = 256, rows: int = 1024, seed: int = 0):
    """Random W and low-rank-plus-noise X with uneven feature scales (H far from I)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(rows, 16, generator=g) @ torch.randn(16, k, generator=g)
    x = x + 0.1 * torch.randn(rows, k, generator=g)
    x = x * torch.linspace(0.2, 3.0, k)
    return w, x, 2.0 * x.T @ x / rows


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - q) @ x.T).norm())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_gptq_beats_rtn(name: str, mode: str) -> None:
    w, x, h = make_problem()
    fmt = FORMATS[name]
    result = gptq_quantize(w, h, fmt, layer_name="l", config=MODES[mode])
    rtn = output_error(w, fake_quantize(w, fmt), x)
    ours = output_error(w, result.weight, x)
    assert ours < 0.8 * rtn, (ours, rtn)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(FORMATS | EXTRA))
def test_qtensor_dequantizes_bit_exactly(name: str, mode: str) -> None:
    w, _, h = make_problem(32, 128, 256)
    fmt = (FORMATS | EXTRA)[name]
    result = gptq_quantize(w, h, fmt, layer_name="l", config=MODES[mode])
    assert result.qtensor.shape == w.shape
    assert torch.equal(bits(dequantize(result.qtensor)), bits(result.weight))


def test_error_stat_is_trace_form() -> None:
    w, _, h = make_problem(16, 128, 256)
    result = gptq_quantize(w, h, FORMATS["int4_g64"], layer_name="l")
    d = (w - result.weight).double()
    expected = float(torch.trace(d @ h.double() @ d.T))
    assert result.stats.error == pytest.approx(expected, rel=1e-4)
    assert result.stats.layer_name == "l"


def test_static_act_order_keeps_contiguous_groups() -> None:
    w, _, h = make_problem()
    fmt = FORMATS["int4_g64"]
    plain = gptq_quantize(w, h, fmt, layer_name="l", config=MODES["static"])
    ordered = gptq_quantize(w, h, fmt, layer_name="l", config=MODES["static_act_order"])
    # scales are the RTN scales of the original W's contiguous groups: no g_idx needed
    assert ordered.qtensor.scale.shape == (64, 256 // 64)
    assert torch.equal(ordered.qtensor.scale, quantize(w, fmt).scale)
    per_elem = ordered.qtensor.scale.repeat_interleave(64, dim=1)
    codes = (ordered.weight / per_elem).round()
    assert torch.equal(codes * per_elem, ordered.weight)
    assert codes.abs().max() <= 8
    # act-order really changed the processing order (and helps here)
    assert not torch.equal(plain.qtensor.codes, ordered.qtensor.codes)
    assert ordered.stats.error < plain.stats.error


def test_dynamic_grouped_act_order_is_rejected() -> None:
    w, _, h = make_problem(8, 128, 64)
    cfg = GPTQConfig(act_order=True, scale_mode="dynamic")
    with pytest.raises(ValueError, match="static"):
        gptq_quantize(w, h, FORMATS["int4_g64"], layer_name="l", config=cfg)
    # per-channel has one column group: dynamic act-order is fine
    gptq_quantize(w, h, FORMATS["int4_channel"], layer_name="l", config=cfg)


def test_dynamic_scales_exact_across_lazy_blocks() -> None:
    """Groups straddling lazy blocks see the pending updates: result independent of B."""
    w, _, h = make_problem()
    fmt = FORMATS["int4_g64"]
    a = gptq_quantize(w, h, fmt, layer_name="l", config=GPTQConfig(block_size=128))
    b = gptq_quantize(w, h, fmt, layer_name="l", config=GPTQConfig(block_size=48))
    agree = (a.qtensor.codes == b.qtensor.codes).float().mean()
    assert agree > 0.99
    assert torch.allclose(a.qtensor.scale, b.qtensor.scale, rtol=1e-4)


def reference_gptq_channel(w: torch.Tensor, h: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Codes of an unblocked OBS sweep in float64 (paper eq. 2-3), per-channel scales."""
    w = w.double().clone()
    hinv = torch.linalg.inv(h.double() + 0.01 * h.diag().mean() * torch.eye(h.shape[0]))
    scale = quantize(w.float(), fmt).scale.double()
    q = torch.zeros_like(w)
    for j in range(w.shape[1]):
        q[:, j] = torch.clamp(torch.round(w[:, j] / scale[:, 0]), -8, 7)
        err = (w[:, j] - q[:, j] * scale[:, 0]) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return q


def test_matches_unblocked_reference() -> None:
    w, _, h = make_problem(32, 128, 512)
    fmt = FORMATS["int4_channel"]
    ours = gptq_quantize(w, h, fmt, layer_name="l", config=GPTQConfig(block_size=32))
    ref = reference_gptq_channel(w, h, fmt)
    assert (ours.qtensor.codes.double() == ref).float().mean() > 0.99


def test_dead_input_column() -> None:
    w, x, _ = make_problem(16, 128, 256)
    x[:, 5] = 0.0
    h = 2.0 * x.T @ x / x.shape[0]
    result = gptq_quantize(w, h, FORMATS["int4_g64"], layer_name="l")
    assert result.stats.dead_columns == 1
    assert torch.all(result.weight[:, 5] == 0)
    assert torch.isfinite(result.weight).all()
    assert output_error(w, result.weight, x) < output_error(
        w, fake_quantize(w, FORMATS["int4_g64"]), x
    )


def indefinite_hessian(k: int, negative: float) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(1)))
    eig = torch.ones(k)
    eig[0] = negative
    return (q * eig) @ q.T


def test_cholesky_failure_retries_with_more_damping() -> None:
    h = indefinite_hessian(64, -0.05)  # PD once damping exceeds 0.05 * mean(diag)
    w = torch.randn(8, 64)
    result = gptq_quantize(w, h, FORMATS["int4_channel"], layer_name="l")
    assert result.stats.retries >= 1
    assert result.stats.damp > 0.05 * float(h.diag().mean())
    _, damp, retries = inverse_hessian_cholesky(h.float(), 0.01, 4, "l")
    assert (retries, damp) == (result.stats.retries, result.stats.damp)


def test_cholesky_failure_raises_naming_the_layer() -> None:
    h = indefinite_hessian(64, -0.05)
    w = torch.randn(8, 64)
    cfg = GPTQConfig(max_damp_retries=0)
    name = "model.layers.3.mlp.up_proj"
    with pytest.raises(HessianError, match=re.escape(name)):
        gptq_quantize(w, h, FORMATS["int4_channel"], layer_name=name, config=cfg)
    with pytest.raises(HessianError, match="blk"):
        gptq_quantize(w, indefinite_hessian(64, -1e6), FORMATS["int4_channel"], layer_name="blk")


def test_deterministic_and_scale_invariant() -> None:
    w, _, h = make_problem(32, 128, 256)
    fmt = FORMATS["nvfp4"]
    a = gptq_quantize(w, h, fmt, layer_name="l")
    b = gptq_quantize(w, h, fmt, layer_name="l")
    c = gptq_quantize(w, 8.0 * h, fmt, layer_name="l")
    assert torch.equal(a.qtensor.codes, b.qtensor.codes)
    assert torch.equal(bits(a.weight), bits(b.weight))
    assert (a.qtensor.codes == c.qtensor.codes).float().mean() > 0.99


def test_shared_global_scale_is_used() -> None:
    w, _, h = make_problem(16, 64, 128)
    gs = torch.tensor([123.0])
    result = gptq_quantize(w, h, FORMATS["nvfp4"], layer_name="l", global_scale=gs)
    assert result.qtensor.global_scale is not None
    assert torch.equal(result.qtensor.global_scale, gs)


def test_bad_shapes_and_values_are_rejected() -> None:
    w, _, h = make_problem(8, 64, 64)
    with pytest.raises(ValueError, match="H"):
        gptq_quantize(w, h[:32, :32], FORMATS["int4_channel"], layer_name="l")
    with pytest.raises(ValueError, match="'l' \\[8, 64\\]: group size 48"):
        gptq_quantize(w, h, QuantFormat(INT4, PerGroup(48)), layer_name="l")
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, h, FORMATS["int4_channel"], layer_name="l")
    with pytest.raises(ValueError, match="block_size"):
        GPTQConfig(block_size=0)


M2 = QuantFormat(FP4_E2M1, PerGroup(64), scale_format="pow2", channel_scale=True)


@pytest.mark.parametrize("mode", ["static", "static_act_order"])
def test_channel_scale_format_keeps_its_row_scales(mode: str) -> None:
    """ZeroQuant-FP M2 (per-row real scale x per-group power of two): GPTQ's static scales
    carry the row scale, so it beats RTN and its QTensor decodes to its weight exactly."""
    w, x, h = make_problem()
    result = gptq_quantize(w, h, M2, layer_name="l", config=MODES[mode])
    assert result.qtensor.channel_scale is not None
    assert torch.equal(bits(dequantize(result.qtensor)), bits(result.weight))
    rtn = output_error(w, fake_quantize(w, M2), x)
    assert output_error(w, result.weight, x) < 0.8 * rtn


def test_channel_scale_format_refuses_dynamic_scales() -> None:
    w, _, h = make_problem()
    with pytest.raises(ValueError, match="channel scale"):
        gptq_quantize(w, h, M2, layer_name="l", config=MODES["dynamic"])


def _reference_factor(
    h: torch.Tensor, perm: torch.Tensor | None, dead: torch.Tensor
) -> torch.Tensor:
    """``U`` as the factorisation was written before it kept its work matrix column-major:
    dead diagonal set on a copy, one gather, a row-major clone per step."""
    hd = h.clone()
    hd[dead, dead] = 1.0
    if perm is not None:
        hd = hd[perm[:, None], perm[None, :]]
    damp = 0.01 * float(torch.diag(hd).mean())
    work = hd.clone()
    work.diagonal().add_(damp)
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(work, out=(work, info))
    torch.cholesky_inverse(work, out=work)
    torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
    return work


@pytest.mark.parametrize("act_order", [True, False])
def test_in_place_factorisation_gives_the_same_bits(act_order: bool) -> None:
    x = torch.randn(300, 200)
    x[:, 7] = 0.0  # a dead column
    h = x.T @ x * (2 / 300)
    h[3, 5] += 1e-3  # not exactly symmetric: the lower triangle of H' is what is factorised
    dead = torch.diag(h) == 0
    diag = torch.diag(h).clone()
    diag[dead] = 1.0
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    before = h.clone()
    u, _, retries = inverse_hessian_cholesky(h, 0.01, 4, "l", perm=perm, dead=dead)
    assert torch.equal(h, before)  # H is the caller's
    assert u.is_contiguous() and retries == 0
    assert torch.equal(u, _reference_factor(h, perm, dead))


@pytest.mark.parametrize("n", [1, 511, 512, 1300])
def test_transpose_in_place(n: int) -> None:
    a = torch.randn(n, n)
    expected = a.T.clone()
    storage = a.data_ptr()
    out = transpose_in_place(a)
    assert out.data_ptr() == storage and torch.equal(out, expected)
    with pytest.raises(ValueError, match="square"):
        transpose_in_place(torch.randn(3, 4))


def test_lazy_update_in_row_slabs_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    import ptq.passes.gptq_math as gm

    w, _, h = make_problem(48, 640, 900)
    fmt = FORMATS["int4_g64"]
    cfg = GPTQConfig(block_size=32, act_order=True, scale_mode="static")
    monkeypatch.setattr(gm, "UPDATE_ROWS", 1 << 20)  # one product per block
    whole = gptq_quantize(w, h, fmt, layer_name="l", config=cfg)
    monkeypatch.setattr(gm, "UPDATE_ROWS", 100)
    slabs = gptq_quantize(w, h, fmt, layer_name="l", config=cfg)
    assert torch.equal(whole.qtensor.codes, slabs.qtensor.codes)
    assert torch.equal(whole.weight, slabs.weight)


def test_permute_rows_in_place() -> None:
    a = torch.randn(37, 5)
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(3))
    expected = a[perm].clone()
    storage = a.data_ptr()
    assert permute_rows_in_place(a, perm).data_ptr() == storage
    assert torch.equal(a, expected)
    with pytest.raises(ValueError, match="permutation"):
        permute_rows_in_place(a, torch.zeros(37, dtype=torch.long))


@pytest.mark.parametrize("act_order", [True, False])
def test_consumed_hessian_factorises_in_its_storage_to_the_same_bits(act_order: bool) -> None:
    x = torch.randn(300, 200)
    x[:, 7] = 0.0
    h = x.T @ x * (2 / 300)
    h[3, 5] += 1e-3  # not exactly symmetric
    dead = torch.diag(h) == 0
    diag = torch.diag(h).clone()
    diag[dead] = 1.0
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
    expected = _reference_factor(h, perm, dead)
    storage = h.data_ptr()
    u, _, _ = inverse_hessian_cholesky(h, 0.01, 4, "l", perm=perm, dead=dead, consume=True)
    assert u.data_ptr() == storage  # no second K x K matrix
    assert torch.equal(u, expected)


def test_consumed_hessian_retries_from_its_spilled_copy() -> None:
    h = indefinite_hessian(64, -0.05)
    expected = inverse_hessian_cholesky(h.float(), 0.01, 4, "l")
    u, damp, retries = inverse_hessian_cholesky(h.float().clone(), 0.01, 4, "l", consume=True)
    assert retries >= 1 and (damp, retries) == expected[1:]
    assert torch.equal(u, expected[0])


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", ["int4_g64", "nvfp4", "int4_g64_asym"])
def test_handed_over_hessian_gives_the_same_codes_and_error(name: str, mode: str) -> None:
    fmt = {**FORMATS, **EXTRA}[name]
    w, x, h = make_problem(32, 256, 512)
    x[:, 9] = 0.0  # a dead column: zero row and column in H
    h = 2.0 * x.T @ x / x.shape[0]
    kept = gptq_quantize(w, h, fmt, layer_name="l", config=MODES[mode])
    owned = OwnedHessian(h.clone())
    given = gptq_quantize(w, owned, fmt, layer_name="l", config=MODES[mode])
    assert torch.equal(kept.qtensor.codes, given.qtensor.codes)
    assert torch.equal(bits(kept.weight), bits(given.weight))
    assert given.stats.dead_columns == 1
    # the error from the sweep's scaled errors: the same trace, other float32 roundings
    assert given.stats.error == pytest.approx(kept.stats.error, rel=1e-3)
    with pytest.raises(ValueError, match="twice"):
        owned.release()


@pytest.mark.parametrize("name", sorted({**FORMATS, **EXTRA, "m2": M2}))
def test_static_scales_by_row_slabs_are_the_whole_tensors(name: str) -> None:
    from ptq.passes.quant_with_scales import block_scales, tensor_global_scale

    fmt = {**FORMATS, **EXTRA, "m2": M2}[name]
    w = torch.randn(600, 128, generator=torch.Generator().manual_seed(5)) * 3
    gs = tensor_global_scale(w, fmt)
    whole, slabs = block_scales(w, fmt, global_scale=gs), static_scales(w, fmt, gs)
    assert slabs.block == whole.block
    for a, b in [
        (whole.stored, slabs.stored),
        (whole.zero_point, slabs.zero_point),
        (whole.global_scale, slabs.global_scale),
        (whole.channel_scale, slabs.channel_scale),
    ]:
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert torch.equal(a, b)
