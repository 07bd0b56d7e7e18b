// host_harness.cpp: the __host__ __device__ decoders and format traits of
// exporters/cuda/csrc, compiled as plain host C++ (g++) into a shared library that the
// tests call through ctypes and compare with ptq.formats.
#include <cstdint>

#include "ptq_formats.cuh"

using namespace ptq;

namespace {

template <class Fmt>
void dequant_all(const WeightView& w, float* out) {
  for (int n = 0; n < w.N; ++n) {
    for (int vi = 0; vi < w.K / Fmt::kElemsPerVec; ++vi) {
      const U32x4 v = Fmt::load_vec(w, n, vi);
      const int k0 = vi * Fmt::kElemsPerVec;
      for (int j = 0; j < Fmt::kElemsPerVec / 8; ++j) {
        float q[8];
        const float s = Fmt::chunk(w, v, n, k0, j, q);
        for (int i = 0; i < 8; ++i) {
          out[static_cast<size_t>(n) * w.K + k0 + 8 * j + i] = Fmt::row_epilogue(w, n, q[i] * s);
        }
      }
    }
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

// wformat: 0 int4, 1 int4 asym, 2 nvfp4, 3 mxfp4, 4 int8, 5 fp8 (ptq_launch.h WFormat);
// scale_kind (INT4): 0 fp32, 1 fp16, 2 bf16. Returns 0, or -1 for an unknown combination.
int h_dequantize(int wformat, int scale_kind, const void* data, const void* scale,
                 const uint32_t* zero, const float* global, const float* row_scale, int N, int K,
                 int group_size, float* out) {
  int shift = 0;
  while ((1 << shift) < group_size) ++shift;
  const WeightView w{data, scale, zero, global, row_scale, N, K, shift};
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
