"""Bit packing: golden bit patterns, round trips, compressed-tensors' own packers."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from hypothesis import given, settings
from hypothesis import strategies as st

from ptq.formats.element import FP4_E2M1
from ptq.formats.minifloat import decode_float, encode_float
from ptq.formats.packing import (
    e4m3_decode,
    e4m3_encode,
    e8m0_decode,
    e8m0_encode,
    pack_bits,
    pack_int32,
    pack_matmul_nbits,
    pack_nibbles,
    unpack_bits,
    unpack_int32,
    unpack_matmul_nbits,
    unpack_nibbles,
)


def test_golden_int4_int32() -> None:
    # q = [-8, -1, 0, 7, 1, 2, 3, 4] -> u = q + 8 = [0, 7, 8, 15, 9, 10, 11, 12]
    # nibbles low-first: word = 0xCBA9F870
    #   bits 31..0: 1100 1011 1010 1001 1111 1000 0111 0000
    q = torch.tensor([[-8, -1, 0, 7, 1, 2, 3, 4]], dtype=torch.int8)
    word = pack_int32(q, 4)
    assert word.shape == (1, 1) and int(word) == 0xCBA9F870 - 2**32
    assert torch.equal(unpack_int32(word, 4, 8), q)


def test_golden_int2_and_int8_int32() -> None:
    # int2: u = q + 2; q = [-2, -1, 0, 1] * 4 -> u = 0,1,2,3 repeated -> byte 0b11100100 = 0xE4
    q2 = torch.tensor([[-2, -1, 0, 1] * 4], dtype=torch.int8)
    assert int(pack_int32(q2, 2)) == 0xE4E4E4E4 - 2**32
    # int8: u = q + 128; q = [-128, 0, 127, -1] -> bytes 0x00 0x80 0xFF 0x7F -> 0x7FFF8000
    q8 = torch.tensor([[-128, 0, 127, -1]], dtype=torch.int8)
    assert int(pack_int32(q8, 8)) == 0x7FFF8000


def test_golden_int3_straddles_words() -> None:
    # 11 codes of 3 bits = 33 bits: element 10 (u = 7) takes bits 30, 31 and 32.
    q = torch.full((1, 11), -4, dtype=torch.int8)  # u = 0
    q[0, 10] = 3  # u = 7 = 0b111
    words = pack_int32(q, 3)
    assert words.shape == (1, 2)
    assert int(words[0, 0]) == -(2**31) + 2**30  # 0xC0000000: bits 30, 31
    assert int(words[0, 1]) == 1  # bit 32
    assert torch.equal(unpack_int32(words, 3, 11), q)


def test_golden_nibbles() -> None:
    # first element in the low nibble: [0x1, 0xA, 0xF] -> 0xA1, 0x0F
    codes = torch.tensor([[0x1, 0xA, 0xF]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0xA1, 0x0F]]
    assert torch.equal(unpack_nibbles(packed, 3), codes)


def test_golden_6bit_stream() -> None:
    # two 6-bit codes 0b111111, 0b000001 -> stream bits 0..5 ones, bit 6 one:
    # byte0 = 0b01111111 = 0x7F, byte1 = 0x00
    packed = pack_bits(torch.tensor([[0x3F, 0x01]]), 6)
    assert packed.tolist() == [[0x7F, 0x00]]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 32, 33, 130])
def test_int32_matches_compressed_tensors(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + n)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, n), generator=g).to(torch.int8)
    ours = pack_int32(q, bits)
    assert torch.equal(ours, pack_to_int32(q, bits))
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size([5, n])), q)
    assert torch.equal(unpack_int32(ours, bits, n), q)


def test_zero_point_packing_along_rows_matches_compressed_tensors() -> None:
    zp = torch.randint(-8, 8, (40, 3), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    ours = pack_int32(zp.T, 4).T
    assert torch.equal(ours, pack_to_int32(zp, 4, packed_dim=0))


def test_fp4_nibbles_match_compressed_tensors() -> None:
    codes = torch.arange(16, dtype=torch.uint8).repeat(3, 2)
    values = decode_float(codes, FP4_E2M1)
    assert torch.equal(pack_nibbles(codes), pack_fp4_to_uint8(values))
    assert torch.equal(encode_float(values, FP4_E2M1), codes)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.integers(1, 8), n=st.integers(1, 70), rows=st.integers(1, 4), seed=st.integers(0, 99)
)
def test_pack_bits_round_trip(bits: int, n: int, rows: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 2**bits, (rows, n), generator=g)
    packed = pack_bits(u, bits)
    assert packed.shape == (rows, (n * bits + 7) // 8)
    assert torch.equal(unpack_bits(packed, bits, n).long(), u)


def test_matmul_nbits_layout() -> None:
    u = torch.randint(0, 16, (3, 40), generator=torch.Generator().manual_seed(1))
    b = pack_matmul_nbits(u, 4, 16)
    assert b.shape == (3, 3, 8)
    assert torch.equal(b[:, 0], pack_nibbles(u[:, :16]))  # block 0, first element low nibble
    assert torch.equal(unpack_matmul_nbits(b, 4, 40).long(), u)


def test_scale_bytes() -> None:
    # E8M0: 2^(x - 127): 0x7F = 1.0, 0x00 = 2^-127, 0xFE = 2^127, 0xFF = NaN
    codes = torch.tensor([0x7F, 0x00, 0xFE, 0x80], dtype=torch.uint8)
    values = e8m0_decode(codes)
    assert values.tolist() == [1.0, 2.0**-127, 2.0**127, 2.0]
    assert torch.equal(e8m0_encode(values), codes)
    assert torch.isnan(e8m0_decode(torch.tensor([0xFF], dtype=torch.uint8))).all()
    with pytest.raises(ValueError, match="powers of two"):
        e8m0_encode(torch.tensor([3.0]))
    # E4M3: 0x7E = 448, 0x38 = 1.0 (0.0111.000), 0x01 = 2^-9
    e4 = torch.tensor([448.0, 1.0, 2.0**-9])
    assert e4m3_encode(e4).tolist() == [0x7E, 0x38, 0x01]
    assert torch.equal(e4m3_decode(e4m3_encode(e4)), e4)
    assert torch.equal(e4m3_encode(e4), e4.to(torch.float8_e4m3fn).view(torch.uint8))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(1, 4, dtype=torch.long), 9)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_bits(torch.full((1, 4), 16), 4)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_int32(torch.full((1, 4), 8, dtype=torch.int8), 4)
