"""quantize / dequantize / fake_quantize: granularity, scale rules, clipping, two levels."""

from __future__ import annotations

import pytest
import torch

from ptq.formats import (
    FP4_E2M1,
    FP8_E4M3,
    INT4,
    INT8,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantFormat,
    dequantize,
    element_values,
    fake_quantize,
    preset,
    preset_names,
    quantize,
)


def _w(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    w[0, 0] = 12.0
    return w


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().view(torch.int32)


@pytest.mark.parametrize("name", preset_names())
def test_fake_quantize_is_bitwise_dequantize_of_quantize(name: str) -> None:
    fmt = preset(name)
    x = _w(rows=130 if isinstance(fmt.granularity, PerBlock) else 64)
    q = quantize(x, fmt)
    assert q.codes.shape == x.shape
    assert torch.equal(_bits(fake_quantize(x, fmt)), _bits(dequantize(q)))
    err = (dequantize(q) - x).pow(2).mean() / x.pow(2).mean()
    # SQNR floors by width (Gaussian data with one outlier; INT2 is ternary-like).
    assert err < {2: 0.6, 3: 0.1, 4: 0.03, 6: 0.005}.get(fmt.bits, 0.005)


def test_group_must_divide() -> None:
    with pytest.raises(ValueError, match=r"group size 128 does not divide .* 576"):
        quantize(torch.randn(4, 576), QuantFormat(INT4, PerGroup(128)))


def test_block_partial_edges_and_shapes() -> None:
    x = _w(rows=200, cols=300)
    q = quantize(x, QuantFormat(FP8_E4M3, PerBlock(128, 128)))
    assert q.scale.shape == (2, 3)
    assert torch.equal(q.scale[1, 2], x[128:, 256:].abs().amax() / 448)
    assert q.scale.shape == quantize(x, preset("fp8_block128")).scale.shape


def test_mx_rule_ocp_golden() -> None:
    # block amax 5.0: floor(log2 5) = 2, emax(E2M1) = 2 -> X = 2^0; 5.0 rounds to 4 (tie-even)
    # block amax 7.0: X = 2^0 and 7 saturates to 6 (the OCP rule clips); round-up gives X = 2.
    x = torch.zeros(2, 32)
    x[0, 0], x[0, 1], x[1, 0] = 5.0, -0.25, 7.0
    q = quantize(x, preset("mxfp4"))
    assert q.scale.flatten().tolist() == [1.0, 1.0]
    assert dequantize(q)[0, :2].tolist() == [4.0, -0.0] and dequantize(q)[1, 0] == 6.0
    up = quantize(
        x, QuantFormat(FP4_E2M1, PerGroup(32), scale_format="e8m0", scale_rule="mx_round_up")
    )
    assert up.scale.flatten().tolist() == [1.0, 2.0] and dequantize(up)[1, 0] == 8.0


def test_mxint8_implicit_scale() -> None:
    # amax 1.5 -> X = 2^0, element q * 2^-6: scale 2^-6, 1.5 -> q = 96.
    x = torch.zeros(1, 32)
    x[0, 0] = 1.5
    q = quantize(x, preset("mxint8"))
    assert float(q.scale) == 2.0**-6 and int(q.codes[0, 0]) == 96


def test_nvfp4_two_levels() -> None:
    x = _w(cols=64)
    q = quantize(x, preset("nvfp4"))
    assert q.global_scale is not None
    g = 448 * 6 / x.abs().amax()
    assert torch.allclose(q.global_scale, g.reshape(1))
    assert float(q.scale.max()) <= 448.0
    assert torch.equal(q.scale, q.scale.to(torch.float8_e4m3fn).float())  # on the E4M3 grid
    expected = element_values(q) * (q.scale / q.global_scale).repeat_interleave(16, dim=1)
    assert torch.equal(_bits(dequantize(q)), _bits(expected))
    shared = quantize(x, preset("nvfp4"), global_scale=torch.tensor([100.0]))
    assert shared.global_scale is not None and float(shared.global_scale) == 100.0


def test_zeroquant_fp_m2_scales() -> None:
    x = _w(cols=256)
    q = quantize(x, preset("fp4_zqfp_m2_g128"))
    assert q.channel_scale is not None and q.channel_scale.shape == (64, 1)
    m, _ = torch.frexp(q.scale)
    assert (m == 0.5).all() and (q.scale <= 1.0).all()  # per-group powers of two <= 1
    # nothing clips: every |x| <= 6 * effective scale
    eff = (q.scale * q.channel_scale).repeat_interleave(128, dim=1)
    assert (x.abs() <= 6 * eff).all()
    m1 = quantize(x, preset("fp4_zqfp_m1"))
    assert (torch.frexp(m1.scale)[0] == 0.5).all()


def test_asymmetric_int_follows_compressed_tensors_order() -> None:
    x = _w() + 3.0
    q = quantize(x, QuantFormat(INT4, PerGroup(64), symmetric=False))
    assert q.zero_point is not None and q.zero_point.dtype == torch.int8
    zp = q.zero_point.float().repeat_interleave(64, dim=1)
    s = q.scale.repeat_interleave(64, dim=1)
    codes = torch.clamp(torch.round(x / s + zp), -8, 7)
    assert torch.equal(q.codes.float(), codes)
    assert torch.equal(dequantize(q), (codes - zp) * s)


def test_mse_clip_never_worse_and_helps_with_outliers() -> None:
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    x[:, 0] = 20.0  # one outlier per row
    plain = QuantFormat(INT4, PerChannel())
    mse = QuantFormat(INT4, PerChannel(), clip="mse")
    e_plain = (fake_quantize(x, plain) - x).pow(2).sum(1)
    e_mse = (fake_quantize(x, mse) - x).pow(2).sum(1)
    assert (e_mse <= e_plain).all()
    assert e_mse.sum() < 0.9 * e_plain.sum()


def test_per_tensor_and_int8() -> None:
    x = _w()
    q = quantize(x, QuantFormat(INT8, PerTensor()))
    assert q.scale.shape == (1, 1) and float(q.scale) == pytest.approx(12.0 / 127)


def test_bad_formats_are_refused() -> None:
    with pytest.raises(ValueError, match="integer element"):
        QuantFormat(FP8_E4M3, symmetric=False)
    with pytest.raises(ValueError, match="e8m0 or pow2"):
        QuantFormat(FP4_E2M1, PerGroup(32), scale_rule="mx")
    with pytest.raises(ValueError, match="M2"):
        QuantFormat(FP4_E2M1, PerChannel(), scale_format="pow2", channel_scale=True)
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(4), QuantFormat(INT4))


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = _w()
    for name in preset_names():
        fmt = preset(name)
        xx = x if not isinstance(fmt.granularity, PerBlock) else _w(rows=130)
        cpu = fake_quantize(xx, fmt)
        gpu = fake_quantize(xx.cuda(), fmt)
        assert gpu.device.type == "cuda"
        assert torch.equal(_bits(gpu.cpu()), _bits(cpu)), name
