// host_harness.cpp: the __host__ __device__ decoders and format traits of
// exporters/cuda/csrc, compiled as plain host C++ (g++) into a shared library that the
// tests call through ctypes and compare with ptq.formats.
#include <cstdint>

#include "ptq_bitstream.cuh"

using namespace ptq;

namespace {

template <class Fmt>
void dequant_all(const WeightView& w, float* out) {
  for (int n = 0; n < w.N; ++n) {
    for (int vi = 0; vi < w.K / Fmt::kElemsPerVec; ++vi) {
      const typename Fmt::Vec v = Fmt::load_vec(w, n, vi);
      const int k0 = vi * Fmt::kElemsPerVec;
      for (int j = 0; j < Fmt::kElemsPerVec / 8; ++j) {
        float q[8];
        const float s = Fmt::chunk(w, v, n, k0, j, q);
        for (int i = 0; i < 8; ++i) {
          const float value = (q[i] * Fmt::kValueScale) * s;
          out[static_cast<size_t>(n) * w.K + k0 + 8 * j + i] = Fmt::row_epilogue(w, n, value);
        }
      }
    }
  }
}

template <template <int> class FmtOf>
int dequant_scaled(int scale_kind, const WeightView& w, float* out) {
  switch (scale_kind) {
    case kScaleF32: dequant_all<FmtOf<kScaleF32>>(w, out); return 0;
    case kScaleF16: dequant_all<FmtOf<kScaleF16>>(w, out); return 0;
    case kScaleBF16: dequant_all<FmtOf<kScaleBF16>>(w, out); return 0;
    case kScaleE8M0: dequant_all<FmtOf<kScaleE8M0>>(w, out); return 0;
    default: return -1;
  }
}

template <int kBits>
struct IntBits {
  template <int kScale>
  using Sym = IntBitsFormat<kBits, kScale, false>;
  template <int kScale>
  using Asym = IntBitsFormat<kBits, kScale, true>;
};
template <int kScale>
using E2M3 = Fp6Format<2, 3, kScale>;
template <int kScale>
using E3M2 = Fp6Format<3, 2, kScale>;

// The bit-stream formats (wformat 6..13 of ptq_launch.h: int3, int3 asym, int5, int5 asym,
// int6, int6 asym, fp6 e2m3, fp6 e3m2).
int dequant_bits(int wformat, int scale_kind, const WeightView& w, float* out) {
  switch (wformat) {
    case 6: return dequant_scaled<IntBits<3>::Sym>(scale_kind, w, out);
    case 7: return dequant_scaled<IntBits<3>::Asym>(scale_kind, w, out);
    case 8: return dequant_scaled<IntBits<5>::Sym>(scale_kind, w, out);
    case 9: return dequant_scaled<IntBits<5>::Asym>(scale_kind, w, out);
    case 10: return dequant_scaled<IntBits<6>::Sym>(scale_kind, w, out);
    case 11: return dequant_scaled<IntBits<6>::Asym>(scale_kind, w, out);
    case 12: return dequant_scaled<E2M3>(scale_kind, w, out);
    case 13: return dequant_scaled<E3M2>(scale_kind, w, out);
    default: return -1;
  }
}

}  // namespace

extern "C" {

float h_half_bits_to_float(uint16_t h) { return half_bits_to_float(h); }
float h_bf16_bits_to_float(uint16_t b) { return bf16_bits_to_float(b); }
float h_e2m1_to_float(uint32_t c) { return e2m1_to_float(c); }
float h_e4m3_to_float(uint32_t c) { return e4m3_to_float(c); }
float h_e8m0_to_float(uint32_t c) { return e8m0_to_float(c); }
float h_int4_value(uint32_t word, int i, float offset) { return int4_value(word, i, offset); }
float h_fp6_e2m3_to_float(uint32_t c) {
  return half_bits_to_float(minifloat_to_half_bits_scaled<2, 3>(c)) * Fp6Format<2, 3, 0>::kValueScale;
}
float h_fp6_e3m2_to_float(uint32_t c) {
  return half_bits_to_float(minifloat_to_half_bits_scaled<3, 2>(c)) * Fp6Format<3, 2, 0>::kValueScale;
}
// Code i (0..31) of the 32 b-bit codes held in words[0 .. bits).
uint32_t h_bits_code(const uint32_t* words, int bits, int i) {
  switch (bits) {
    case 3: return bits_code(load_bits_vec<3>(words, 0), i);
    case 5: return bits_code(load_bits_vec<5>(words, 0), i);
    case 6: return bits_code(load_bits_vec<6>(words, 0), i);
    default: return 0xFFFFFFFFu;
  }
}

// wformat: 0 int4, 1 int4 asym, 2 nvfp4, 3 mxfp4, 4 int8, 5 fp8, 6..13 the bit-stream
// formats (ptq_launch.h WFormat); scale_kind (INT4, bit streams): 0 fp32, 1 fp16, 2 bf16,
// 3 E8M0 (bit streams only). Returns 0, or -1 for an unknown combination.
int h_dequantize(int wformat, int scale_kind, const void* data, const void* scale,
                 const uint32_t* zero, const float* global, const float* row_scale, int N, int K,
                 int group_size, float* out) {
  int shift = 0;
  while ((1 << shift) < group_size) ++shift;
  const WeightView w{data, scale, zero, global, row_scale, N, K, shift};
  if (wformat >= 6) return dequant_bits(wformat, scale_kind, w, out);
  switch (wformat * 10 + scale_kind) {
    case 0: dequant_all<Int4Format<kScaleF32, false>>(w, out); return 0;
    case 1: dequant_all<Int4Format<kScaleF16, false>>(w, out); return 0;
    case 2: dequant_all<Int4Format<kScaleBF16, false>>(w, out); return 0;
    case 10: dequant_all<Int4Format<kScaleF32, true>>(w, out); return 0;
    case 11: dequant_all<Int4Format<kScaleF16, true>>(w, out); return 0;
    case 12: dequant_all<Int4Format<kScaleBF16, true>>(w, out); return 0;
    case 20: dequant_all<Fp4Format<true>>(w, out); return 0;
    case 30: dequant_all<Fp4Format<false>>(w, out); return 0;
    case 40: dequant_all<Byte8Format<false>>(w, out); return 0;
    case 50: dequant_all<Byte8Format<true>>(w, out); return 0;
    default: return -1;
  }
}

}  // extern "C"
