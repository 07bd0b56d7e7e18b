// ptq_bitstream.cuh: the b-bit stream formats of ptq's own layout (INT3, INT5, INT6 and
// FP6 E2M3 / E3M2) as format traits for the GEMV and the host tests (LAYOUT.md).
//
// A row of W [N, K] is a little-endian bit stream: code i occupies stream bits
// i*b .. i*b + b - 1, stream bit t is bit t % 8 of byte t / 8 (ptq.formats.packing.pack_bits).
// With K % 32 == 0 a row is exactly K*b/32 little-endian 32-bit words, and 32 consecutive
// codes starting at a multiple of 32 are exactly b whole words: the unit one lane loads
// (`BitsVec<b>`) and decodes. Code i of such a chunk is bits (i*b) % 32 .. of word
// (i*b) / 32, continued from bit 0 of the next word when (i*b) % 32 + b > 32 (a funnel
// shift of the two words). The chunk index i is a compile-time constant in the unrolled
// loops, so every word index and shift is a constant: one SHF (or SHR) and one LOP3 per code.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "ptq_formats.cuh"

namespace ptq {

// 32 consecutive b-bit codes = b little-endian 32-bit words.
template <int kBits>
struct BitsVec {
  uint32_t w[kBits];
};

// The kBits words at 32-bit word `word_offset` of `base` (64-bit loads when kBits is
// even: the offset is then a multiple of kBits words, hence of 2).
template <int kBits>
PTQ_HD BitsVec<kBits> load_bits_vec(const void* base, size_t word_offset) {
  const uint32_t* p = static_cast<const uint32_t*>(base) + word_offset;
  BitsVec<kBits> v;
#if defined(__CUDA_ARCH__)
  if constexpr (kBits % 2 == 0) {
#pragma unroll
    for (int j = 0; j < kBits / 2; ++j) {
      const uint2 t = __ldg(reinterpret_cast<const uint2*>(p) + j);
      v.w[2 * j] = t.x;
      v.w[2 * j + 1] = t.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kBits; ++j) v.w[j] = __ldg(p + j);
  }
#else
  std::memcpy(v.w, p, sizeof(v.w));  // the host tests run on little-endian CPUs
#endif
  return v;
}

// Code i (0..31) of a 32-code chunk.
template <int kBits>
PTQ_HD uint32_t bits_code(const BitsVec<kBits>& v, int i) {
  const int bit = i * kBits;
  const int lo = bit >> 5;
  const int sh = bit & 31;
  uint32_t x;
  if (sh + kBits > 32) {  // straddles words lo and lo + 1 (then 0 < sh < 32)
#if defined(__CUDA_ARCH__)
    x = __funnelshift_r(v.w[lo], v.w[lo + 1], sh);
#else
    x = (v.w[lo] >> sh) | (v.w[lo + 1] << (32 - sh));
#endif
  } else {
    x = v.w[lo] >> sh;
  }
  return x & ((1u << kBits) - 1u);
}

// Row n's chunk vi (codes 32 vi .. 32 vi + 31) of a [N, K] bit-stream matrix.
template <int kBits>
PTQ_HD BitsVec<kBits> load_bits_chunk(const WeightView& w, int n, int vi) {
  return load_bits_vec<kBits>(w.data, (static_cast<size_t>(n) * (w.K / 32) + vi) * kBits);
}

// Index of the group scale of element k of row n in [N, K / group].
PTQ_HD size_t group_index(const WeightView& w, int n, int k) {
  return static_cast<size_t>(n) * (w.K >> w.group_shift) + (k >> w.group_shift);
}

// A format's vector: a 32-code chunk with its group's scale and integer code offset,
// loaded together (the scale and zero-point loads are in flight with the weight words,
// once per chunk; a chunk lies in one group since groups are powers of two >= 32).
template <int kBits>
struct BitsChunk {
  BitsVec<kBits> words;
  float scale;
  float offset;  // integers: 2^(b-1) + zero point; FP6: unused (0)
};

// Signed integers of kBits bits stored offset-binary, u = q + 2^(kBits-1); group scales
// [N, K / g] of kScaleKind; kAsym: int8 zero points z [N, K / g]. W = (u - 2^(b-1) - z) s.
// Group sizes are powers of two >= 32, so a 32-code chunk lies in one group.
template <int kBits, int kScaleKind, bool kAsym>
struct IntBitsFormat {
  using Vec = BitsChunk<kBits>;
  static constexpr int kElemsPerVec = 32;
  static constexpr bool kHalf2Dot = false;
  static constexpr float kValueScale = 1.0f;

  PTQ_HD static Vec load_vec(const WeightView& w, int n, int vi) {
    const size_t g = group_index(w, n, 32 * vi);
    float offset = static_cast<float>(1 << (kBits - 1));
    if constexpr (kAsym) {
      offset += static_cast<float>(load_scalar(reinterpret_cast<const int8_t*>(w.zero) + g));
    }
    return Vec{load_bits_chunk<kBits>(w, n, vi), load_scale<kScaleKind>(w.scale, g), offset};
  }
  PTQ_HD static float chunk(const WeightView&, const Vec& v, int, int, int j, float out[8]) {
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = int_code_value(bits_code(v.words, 8 * j + i), v.offset);
    return v.scale;
  }
  PTQ_HD static float row_epilogue(const WeightView&, int, float acc) { return acc; }
};

// FP6 ExMy (E2M3: kExp 2, kMan 3, bias 1; E3M2: 3, 2, bias 3; OCP MX, no Inf/NaN) with
// group scales of kScaleKind (E8M0 for MXFP6). `chunk` gives value * 2^(bias - 15) (the
// fp16 pattern of minifloat_to_half_bits_scaled, converted exactly); kValueScale =
// 2^(15 - bias) restores the value.
template <int kExp, int kMan, int kScaleKind>
struct Fp6Format {
  static_assert(kExp + kMan == 5, "FP6 has 1 sign, kExp exponent and kMan mantissa bits");
  using Vec = BitsChunk<6>;
  static constexpr int kElemsPerVec = 32;
  static constexpr bool kHalf2Dot = false;
  static constexpr int kBias = (1 << (kExp - 1)) - 1;
  static constexpr float kValueScale = static_cast<float>(1u << (15 - kBias));

  PTQ_HD static Vec load_vec(const WeightView& w, int n, int vi) {
    const float s = load_scale<kScaleKind>(w.scale, group_index(w, n, 32 * vi));
    return Vec{load_bits_chunk<6>(w, n, vi), s, 0.0f};
  }
  PTQ_HD static float chunk(const WeightView&, const Vec& v, int, int, int j, float out[8]) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t code = bits_code(v.words, 8 * j + i);
      out[i] = half_bits_to_float(minifloat_to_half_bits_scaled<kExp, kMan>(code));
    }
    return v.scale;
  }
  PTQ_HD static float row_epilogue(const WeightView&, int, float acc) { return acc; }
};

}  // namespace ptq
