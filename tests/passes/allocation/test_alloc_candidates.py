"""Exact byte counts of candidates (worked by hand in the comments) and name parsing."""

from __future__ import annotations

import pytest

from ptq.formats import (
    FP4_E2M1,
    FP8_E4M3,
    INT3,
    INT4,
    INT8,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    QuantFormat,
)
from ptq.formats.presets import storage_bits
from ptq.passes.allocation import (
    Candidate,
    LatencyModel,
    candidate_bytes,
    parse_candidate,
    parse_candidates,
    tensor_bytes,
)

INT4_G128 = QuantFormat(INT4, PerGroup(128), scale_format="fp16")


def test_int4_g128_4096_by_hand() -> None:
    # codes 4096*4096*4/8 = 8_388_608; scales [4096, 4096/128 = 32] fp16 = 4096*32*2 = 262_144
    expected = 4096 * 4096 // 2 + 4096 * 32 * 2
    assert expected == 8_650_752
    assert candidate_bytes(Candidate("int4_g128", INT4_G128), 4096, 4096) == expected
    # 4.125 bits per weight (docs/invariants.md, "Serving arithmetic")
    assert 8 * expected / 4096**2 == 4.125


def test_int8_channel_and_fp16_by_hand() -> None:
    fmt = QuantFormat(INT8, PerChannel(), scale_format="fp16")
    # codes 11008*4096 bytes; one fp16 scale per output row: 11008*2
    assert candidate_bytes(Candidate("i8", fmt), 11008, 4096) == 11008 * 4096 + 11008 * 2
    # keep in 16 bits: 2 bytes a weight; fp32 keep: 4 bytes
    assert candidate_bytes(Candidate("fp16", None), 11008, 4096) == 11008 * 4096 * 2
    assert candidate_bytes(Candidate("fp32", None, dense_bits=32), 7, 3) == 7 * 3 * 4


def test_nvfp4_by_hand() -> None:
    fmt = QuantFormat(FP4_E2M1, PerGroup(16), scale_format="e4m3", global_scale=True)
    # codes 4096*1024/2 = 2_097_152; e4m3 scales [4096, 64] x 1 B = 262_144; global fp32 4 B
    assert candidate_bytes(Candidate("nvfp4", fmt), 4096, 1024) == 2_097_152 + 262_144 + 4


def test_mxfp4_by_hand() -> None:
    fmt = QuantFormat(FP4_E2M1, PerGroup(32), scale_format="e8m0", scale_rule="mx")
    # codes 576*1536/2 = 442_368; e8m0 scales [576, 48] x 1 B = 27_648 -> 4.25 bits/weight
    n = candidate_bytes(Candidate("mxfp4", fmt), 576, 1536)
    assert n == 442_368 + 27_648
    assert 8 * n / (576 * 1536) == 4.25


def test_fp8_block_partial_edge_tiles() -> None:
    fmt = QuantFormat(FP8_E4M3, PerBlock(128, 128), scale_format="fp32")
    # codes 300*200 B; scales [ceil(300/128)=3, ceil(200/128)=2] fp32 = 6*4 = 24 B
    assert tensor_bytes(fmt, 300, 200) == 60_000 + 24


def test_asymmetric_int3_zero_points_and_row_padding() -> None:
    fmt = QuantFormat(INT3, PerGroup(10), symmetric=False, scale_format="bf16")
    # per row ceil(30*3/8) = ceil(11.25) = 12 B -> 5 rows: 60 B
    # scales [5, 3] bf16 = 15*2 = 30 B; zero points 15 x 3 bits = 45 bits -> 6 B
    assert tensor_bytes(fmt, 5, 30) == 60 + 30 + 6
    # int32 packing (compressed-tensors): ceil(90/32) = 3 words = 12 B per row, same here
    assert tensor_bytes(fmt, 5, 30, word_bits=32) == 60 + 30 + 6
    # K = 50: 150 bits -> 19 B per byte-packed row, 5 words = 20 B per int32-packed row
    fmt50 = fmt.with_granularity(PerGroup(50))
    assert tensor_bytes(fmt50, 2, 50) == 2 * 19 + 2 * 2 + 1
    assert tensor_bytes(fmt50, 2, 50, word_bits=32) == 2 * 20 + 2 * 2 + 1


def test_per_tensor_scale() -> None:
    fmt = QuantFormat(INT8, PerTensor(), scale_format="fp32")
    assert tensor_bytes(fmt, 64, 32) == 64 * 32 + 4


def test_lorc_factors_dense_and_quantized() -> None:
    # U [4096, 16] and V [16, 4096] dense fp16: (65_536 + 65_536) * 2 B
    dense = Candidate("l", INT4_G128, lorc_rank=16)
    assert candidate_bytes(dense, 4096, 4096) == 8_650_752 + 2 * 65_536 * 2
    # INT8 per-channel factors: U 4096*16 + 4096*2 (scales), V 16*4096 + 16*2
    i8 = QuantFormat(INT8, PerChannel(), scale_format="fp16")
    q = Candidate("lq", INT4_G128, lorc_rank=16, lorc_format=i8)
    assert candidate_bytes(q, 4096, 4096) == 8_650_752 + (65_536 + 8192) + (65_536 + 32)


@pytest.mark.parametrize(
    "name", ["int4_g128", "int8_channel", "nvfp4", "mxfp4", "int3_g64", "fp8", "mxfp6"]
)
def test_byte_count_agrees_with_preset_storage_bits(name: str) -> None:
    cand = parse_candidate(name)
    assert cand.fmt is not None
    for n, k in [(4096, 4096), (576, 1536), (96, 256)]:
        assert 8 * candidate_bytes(cand, n, k) == storage_bits(cand.fmt, n, k)


def test_group_that_does_not_divide_names_candidate() -> None:
    with pytest.raises(ValueError, match=r"'int4_g128'.*576"):
        candidate_bytes(Candidate("int4_g128", INT4_G128), 576, 576)


def test_bad_shapes_and_candidates() -> None:
    with pytest.raises(ValueError, match="positive"):
        candidate_bytes(Candidate("fp16", None), 0, 4)
    with pytest.raises(ValueError, match="LoRC needs"):
        Candidate("x", None, lorc_rank=4)
    with pytest.raises(ValueError, match="rank > 0"):
        Candidate("x", INT4_G128, lorc_format=INT4_G128)
    with pytest.raises(ValueError, match="non-empty"):
        Candidate("", INT4_G128)


def test_parse_candidate_list() -> None:
    cands = parse_candidates("int8_channel, fp8,int4_g128,nvfp4,mxfp4,int3_g64,fp16")
    assert [c.name for c in cands] == [
        "int8_channel", "fp8", "int4_g128", "nvfp4", "mxfp4", "int3_g64", "fp16"
    ]  # fmt: skip
    by = {c.name: c for c in cands}
    assert by["fp16"].fmt is None
    assert by["int4_g128"].fmt == INT4_G128.__class__(
        INT4, PerGroup(128), scale_format="fp16", name="int4_g128"
    )
    nv = by["nvfp4"].fmt
    assert nv is not None and nv.element == FP4_E2M1 and nv.global_scale
    assert nv.granularity == PerGroup(16) and nv.scale_format == "e4m3"
    mx = by["mxfp4"].fmt
    assert mx is not None and mx.scale_format == "e8m0" and mx.scale_rule == "mx"
    assert mx.granularity == PerGroup(32)
    fp8 = by["fp8"].fmt
    assert fp8 is not None and fp8.element == FP8_E4M3


def test_parse_local_integer_family_and_lorc() -> None:
    c = parse_candidate("int4_g256_asym")
    assert c.fmt is not None and c.fmt.granularity == PerGroup(256) and not c.fmt.symmetric
    lorc = parse_candidate("int3_g64+lorc8@int8_channel")
    assert lorc.lorc_rank == 8 and lorc.fmt is not None and lorc.fmt.bits == 3
    assert lorc.lorc_format is not None and lorc.lorc_format.bits == 8
    dense = parse_candidate("int4_g128+lorc32")
    assert dense.lorc_rank == 32 and dense.lorc_format is None


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("int9_g128", "unknown candidate format"),
        ("fp16+lorc8", "quantized base"),
        ("int4_g128+lorc0", "rank must be >= 1"),
        ("int4_g128+lora8", "unknown candidate format|malformed"),
        ("int4_g128,,fp16", "empty entry"),
        ("", "empty"),
        ("fp16,fp16", "listed twice"),
    ],
)
def test_parse_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_candidates(spec)


def test_latency_roofline() -> None:
    cand = Candidate("int4_g128", INT4_G128)
    model = LatencyModel(bandwidth=1e12, efficiency={"int4_g128": 0.5})
    # 8_650_752 B / 1e12 B/s / 0.5
    assert model.seconds(cand, 4096, 4096) == pytest.approx(8_650_752 / 1e12 / 0.5, rel=1e-12)
    assert LatencyModel(bandwidth=2e12).seconds(cand, 4096, 4096) == pytest.approx(
        8_650_752 / 2e12, rel=1e-12
    )
    with pytest.raises(ValueError, match="efficiency"):
        LatencyModel(efficiency={"x": 0.0})
    with pytest.raises(ValueError, match="bandwidth"):
        LatencyModel(bandwidth=-1.0)
