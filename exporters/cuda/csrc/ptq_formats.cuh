// ptq_formats.cuh: packed weight formats as small traits, shared by GEMV, GEMM and host tests.
//
// A weight matrix W [N, K] is read in vectors (`Fmt::Vec`) along K: 128 bits for the
// compressed-tensors formats (32 elements for 4-bit formats, 16 for 8-bit ones), b 32-bit
// words (32 elements) for the b-bit stream formats of ptq_bitstream.cuh. A vector is
// decoded in chunks of 8 elements. For chunk j of the vector that starts at k0, `chunk`
// writes the 8 element values (zero point removed, group scale NOT applied) and returns
// the group scale, so that
//     W[n, k0 + 8j + i] = (out[i] * kValueScale) * scale   (then row_epilogue per row)
// kValueScale is a power of two (1 unless a decoder leaves it out, e.g. FP6's 2^(15-bias)):
// exact, so the kernels may apply it once per chunk dot product instead of per element.
// Per-channel scales (INT8/FP8) and the NVFP4 1/global factor are linear in the dot
// product, so they are applied once per output by `row_epilogue` instead.
// Layouts: see LAYOUT.md next to this file. All functions are __host__ __device__.
#pragma once
#include <cstddef>
#include <cstdint>

#include "ptq_decode.cuh"

namespace ptq {

struct alignas(16) U32x4 {
  uint32_t w[4];
};

// A group's scale and the code offset subtracted before scaling (INT4: 8 or the zero point).
struct ScaleZero {
  float scale;
  float zero;
};

// Scale element types of INT4 group scales.
// E8M0: uint8 codes 2^(x - 127) (the MX shared scale, bit-stream formats only).
enum ScaleKind : int { kScaleF32 = 0, kScaleF16 = 1, kScaleBF16 = 2, kScaleE8M0 = 3 };

struct WeightView {
  const void* data;        // packed weights, row-major [N, K * bits / 8] bytes
  const void* scale;       // group scales [N, K / group] (format-dependent element type)
  const uint32_t* zero;    // zero points: INT4 int32 [ceil(N / 8), K / group] packed along
                           // N; bit-stream INT int8 [N, K / group] (read as int8_t)
  const float* global;     // NVFP4 global scale, fp32 [1]
  const float* row_scale;  // per-channel scales, fp32 [N]
  int N;
  int K;
  int group_shift;  // log2(group size)
};

PTQ_HD U32x4 load_vec16(const void* base, size_t byte_offset) {
  const char* p = static_cast<const char*>(base) + byte_offset;
#if defined(__CUDA_ARCH__)
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  return U32x4{{v.x, v.y, v.z, v.w}};
#else
  U32x4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#endif
}

template <typename T>
PTQ_HD T load_scalar(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

template <int kScaleKind>
PTQ_HD float load_scale(const void* base, size_t idx) {
  if constexpr (kScaleKind == kScaleF32) {
    return load_scalar(static_cast<const float*>(base) + idx);
  } else if constexpr (kScaleKind == kScaleF16) {
    return half_bits_to_float(load_scalar(static_cast<const uint16_t*>(base) + idx));
  } else if constexpr (kScaleKind == kScaleE8M0) {
    return e8m0_to_float(load_scalar(static_cast<const uint8_t*>(base) + idx));
  } else {
    return bf16_bits_to_float(load_scalar(static_cast<const uint16_t*>(base) + idx));
  }
}

// compressed-tensors pack-quantized INT4: int32 words of 8 nibbles, low nibble first,
// stored u = q + 8; group scales [N, K/g]; optional zero points packed along N.
template <int kScaleKind, bool kAsym>
struct Int4Format {
  using Vec = U32x4;
  static constexpr int kElemsPerVec = 32;
  static constexpr bool kHalf2Dot = true;  // GEMV may use int4_dot8_half2 (ptq_half2.cuh)
  static constexpr float kValueScale = 1.0f;

  // {group scale, zero offset} of element k of row n: W[n, k] = (u - offset) * scale.
  PTQ_HD static ScaleZero group_params(const WeightView& w, int n, int k) {
    const int groups = w.K >> w.group_shift;
    const int g = k >> w.group_shift;
    const float s = load_scale<kScaleKind>(w.scale, static_cast<size_t>(n) * groups + g);
    if constexpr (kAsym) {
      const uint32_t zw = load_scalar(w.zero + static_cast<size_t>(n >> 3) * groups + g);
      return ScaleZero{s, static_cast<float>(nibble(zw, n & 7))};
    } else {
      return ScaleZero{s, 8.0f};
    }
  }

  PTQ_HD static U32x4 load_vec(const WeightView& w, int n, int vi) {
    return load_vec16(w.data, (static_cast<size_t>(n) * w.K / 2) + 16u * vi);
  }
  PTQ_HD static float chunk(const WeightView& w, const U32x4& v, int n, int k0, int j,
                            float out[8]) {
    const ScaleZero p = group_params(w, n, k0 + 8 * j);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = int4_value(v.w[j], i, p.zero);
    return p.scale;
  }
  PTQ_HD static float row_epilogue(const WeightView&, int, float acc) { return acc; }
};

// FP4 E2M1 codes, two per byte (low nibble = even k). kNv: NVFP4 (E4M3 scale per 16,
// fp32 global divisor); otherwise MXFP4 (E8M0 scale per 32).
template <bool kNv>
struct Fp4Format {
  using Vec = U32x4;
  static constexpr int kElemsPerVec = 32;
  static constexpr bool kHalf2Dot = false;
  static constexpr float kValueScale = 1.0f;

  PTQ_HD static U32x4 load_vec(const WeightView& w, int n, int vi) {
    return load_vec16(w.data, (static_cast<size_t>(n) * w.K / 2) + 16u * vi);
  }
  PTQ_HD static float chunk(const WeightView& w, const U32x4& v, int n, int k0, int j,
                            float out[8]) {
    const int k = k0 + 8 * j;
    const uint8_t* sc = static_cast<const uint8_t*>(w.scale);
    float s;
    if constexpr (kNv) {
      s = e4m3_to_float(load_scalar(sc + static_cast<size_t>(n) * (w.K / 16) + k / 16));
    } else {
      s = e8m0_to_float(load_scalar(sc + static_cast<size_t>(n) * (w.K / 32) + k / 32));
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = e2m1_to_float((v.w[j] >> (4 * i)) & 0xFu);
    return s;
  }
  PTQ_HD static float row_epilogue(const WeightView& w, int, float acc) {
    if constexpr (kNv) {
      return acc / load_scalar(w.global);
    } else {
      return acc;
    }
  }
};

// One byte per element: INT8 (two's complement) or FP8 E4M3, per-channel fp32 scale.
template <bool kFp8>
struct Byte8Format {
  using Vec = U32x4;
  static constexpr int kElemsPerVec = 16;
  static constexpr bool kHalf2Dot = false;
  static constexpr float kValueScale = 1.0f;

  PTQ_HD static U32x4 load_vec(const WeightView& w, int n, int vi) {
    return load_vec16(w.data, static_cast<size_t>(n) * w.K + 16u * vi);
  }
  PTQ_HD static float chunk(const WeightView&, const U32x4& v, int, int, int j, float out[8]) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t b = (v.w[2 * j + i / 4] >> (8 * (i % 4))) & 0xFFu;
      if constexpr (kFp8) {
        out[i] = half_bits_to_float(e4m3_to_half_bits_scaled(b)) * 256.0f;
      } else {
        out[i] = static_cast<float>(static_cast<int8_t>(b));
      }
    }
    return 1.0f;
  }
  PTQ_HD static float row_epilogue(const WeightView& w, int n, float acc) {
    return acc * load_scalar(w.row_scale + n);
  }
};

}  // namespace ptq
