// ptq_act.cuh: device-side activation loads and output stores for the kernels.
//
// Activations come as fp16, bf16 or FP8 E4M3 (W4A8 / W8A8, with per-token fp32 scales).
// GEMV reads 8 of them as fp32; GEMM stages 8 of them in the mma compute type (fp16 for
// fp16 and FP8->fp16, bf16 for bf16), which represents every E4M3 value exactly.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "ptq_formats.cuh"
#include "ptq_launch.h"

namespace ptq {

// The mma input type for an (activation, output) pair.
template <int kAct, int kOut>
struct ComputeType {
  using type = __half;
};
template <>
struct ComputeType<kBF16, kBF16> {
  using type = __nv_bfloat16;
};
template <>
struct ComputeType<kFP8, kBF16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ float e4m3_fast(uint32_t byte) {
  return half_bits_to_float(e4m3_to_half_bits_scaled(byte)) * 256.0f;
}

// x[idx .. idx + 8) (idx a multiple of 8) as fp32.
template <int kAct>
__device__ __forceinline__ void load_act8(const void* x, size_t idx, float out[8]) {
  if constexpr (kAct == kFP8) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(x) + idx));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[i] = e4m3_fast((v.x >> (8 * i)) & 0xFFu);
      out[4 + i] = e4m3_fast((v.y >> (8 * i)) & 0xFFu);
    }
  } else {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(x) + idx));
    const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (kAct == kF16) {
        out[2 * i] = half_bits_to_float(static_cast<uint16_t>(words[i] & 0xFFFFu));
        out[2 * i + 1] = half_bits_to_float(static_cast<uint16_t>(words[i] >> 16));
      } else {
        out[2 * i] = bf16_bits_to_float(static_cast<uint16_t>(words[i] & 0xFFFFu));
        out[2 * i + 1] = bf16_bits_to_float(static_cast<uint16_t>(words[i] >> 16));
      }
    }
  }
}

template <typename CT>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<CT, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// 8 values (already scaled) packed as 8 CT in 16 bytes.
template <typename CT>
__device__ __forceinline__ uint4 pack8(const float v[8]) {
  return make_uint4(pack2<CT>(v[0], v[1]), pack2<CT>(v[2], v[3]), pack2<CT>(v[4], v[5]),
                    pack2<CT>(v[6], v[7]));
}

// x[idx .. idx + 8) in the compute type CT (a plain copy unless x is FP8).
template <int kAct, typename CT>
__device__ __forceinline__ uint4 load_act8_ct(const void* x, size_t idx) {
  if constexpr (kAct == kFP8) {
    float v[8];
    load_act8<kFP8>(x, idx, v);
    return pack8<CT>(v);
  } else {
    return __ldg(reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(x) + idx));
  }
}

template <int kOut>
__device__ __forceinline__ float load_out_scalar(const void* p, size_t i) {
  const uint16_t b = __ldg(static_cast<const uint16_t*>(p) + i);
  return kOut == kF16 ? half_bits_to_float(b) : bf16_bits_to_float(b);
}

template <int kOut>
__device__ __forceinline__ void store_out(void* p, size_t i, float v) {
  if constexpr (kOut == kF16) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
}

// The scalar epilogue shared by GEMV and GEMM, before the bias:
// out = row_epilogue(acc) * x_scale[m] (FP8 activations only).
template <class Fmt, int kAct>
__device__ __forceinline__ float finish(const QLinearArgs& a, const WeightView& w, int m, int n,
                                        float acc) {
  float v = Fmt::row_epilogue(w, n, acc);
  if constexpr (kAct == kFP8) v *= __ldg(a.x_scale + m);
  return v;
}

}  // namespace ptq
