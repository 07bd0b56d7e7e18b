// ptq_half2.cuh: INT4 x fp16/bf16 dot products on packed half2 lanes (GEMV fast path).
//
// The fp32 GEMV path spends ~7 instructions per weight (nibble extract, int->float,
// activation convert, FMA), so batch-1 decode is bound by instruction issue, not by
// memory. Here two weights are decoded per instruction and multiplied in half2:
//
// * Magic-number decode (Kim et al., "Who Says Elephants Can't Run", 2022): OR-ing a
//   nibble u into the mantissa of 1024 (fp16 0x6400) or 128 (bf16 0x4300) gives the
//   exact value 1024 + u (128 + u). One LOP3 does this for the nibbles i and i + 4 of a
//   word (mask 0x000F000F after a shift by 4i), so four LOP3 decode 8 weights.
// * One HFMA2 maps it to (u - z) / 8: (1024 + u) * 0.125 - (128 + z / 8) (bf16:
//   (128 + u) * 0.125 - (16 + z / 8)); every step is exact in the 16-bit type (the
//   spacing at 128 in fp16 and at 16 in bf16 is 1/8). Dividing by 8 keeps partial sums
//   within fp16 range for |x| < 16384; the 8 is folded into the group scale.
// * Activations x[0..8) come as four words (x0,x1)(x2,x3)(x4,x5)(x6,x7); PRMT regroups
//   them into (x0,x4)(x1,x5)(x2,x6)(x3,x7) to line up with the decoded pairs.
// * Four HFMA2 give two partial sums of four products in the 16-bit type; they are
//   added in fp32, so at most four products are ever summed in 16 bits.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ptq_launch.h"

namespace ptq {

// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <int kAct>
struct Half2Ops;

template <>
struct Half2Ops<kF16> {
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024 in both halves
  __device__ __forceinline__ static uint32_t bias(float zero) {
    const __half h = __float2half_rn(-(128.0f + 0.125f * zero));
    const __half2 b = __half2half2(h);
    return *reinterpret_cast<const uint32_t*>(&b);
  }
  __device__ __forceinline__ static uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    const __half2 r = __hfma2(*reinterpret_cast<const __half2*>(&a),
                              *reinterpret_cast<const __half2*>(&b),
                              *reinterpret_cast<const __half2*>(&c));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ __forceinline__ static uint32_t eighth() { return 0x30003000u; }  // 0.125
  __device__ __forceinline__ static float sum(uint32_t a) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&a));
    return f.x + f.y;
  }
};

template <>
struct Half2Ops<kBF16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // 128 in both halves
  __device__ __forceinline__ static uint32_t bias(float zero) {
    const __nv_bfloat16 h = __float2bfloat16_rn(-(16.0f + 0.125f * zero));
    const __nv_bfloat162 b = __bfloat162bfloat162(h);
    return *reinterpret_cast<const uint32_t*>(&b);
  }
  __device__ __forceinline__ static uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    const __nv_bfloat162 r = __hfma2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                     *reinterpret_cast<const __nv_bfloat162*>(&b),
                                     *reinterpret_cast<const __nv_bfloat162*>(&c));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ __forceinline__ static uint32_t eighth() { return 0x3E003E00u; }  // 0.125
  __device__ __forceinline__ static float sum(uint32_t a) {
    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&a));
    return f.x + f.y;
  }
};

// sum_i (u_i - z) x_i / 8 over the 8 nibbles of `word` (element i = nibble i) and
// x[0..8) packed as `xv`; `bias2` = Half2Ops<kAct>::bias(z).
template <int kAct>
__device__ __forceinline__ float int4_dot8_half2(uint32_t word, uint4 xv, uint32_t bias2) {
  using Ops = Half2Ops<kAct>;
  const uint32_t xs[4] = {__byte_perm(xv.x, xv.z, 0x5410), __byte_perm(xv.x, xv.z, 0x7632),
                          __byte_perm(xv.y, xv.w, 0x5410), __byte_perm(xv.y, xv.w, 0x7632)};
  uint32_t acc = 0u;  // +0.0 in both halves, both types
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t raw = lop3_and_or(word >> (4 * i), 0x000F000Fu, Ops::kMagic);
    const uint32_t q = Ops::fma(raw, Ops::eighth(), bias2);
    acc = Ops::fma(q, xs[i], acc);
  }
  return Ops::sum(acc);
}

}  // namespace ptq
