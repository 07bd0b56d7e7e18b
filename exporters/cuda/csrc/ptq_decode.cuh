// ptq_decode.cuh: bit-level decoders shared by the CUDA kernels and the CPU host tests.
//
// Every function here is `__host__ __device__` and depends on nothing but <cstdint>:
// compiled by nvcc it runs inside the kernels, compiled by g++ (PTQ_HD empty) it runs in
// the host test harness that checks it, code by code, against ptq.formats.
//
// Value definitions (docs/formats.md sections 1-2):
//   INT4 (compressed-tensors)  u in [0, 15] stored, value q = u - 8 (or u - zero_point)
//   FP4 E2M1                   bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa
//   FP8 E4M3 (OCP, "fn")       bit 7 sign, bits 6-3 exponent (bias 7), bits 2-0 mantissa,
//                              S.1111.111 is NaN, no Inf
//   E8M0                       2^(x - 127), 0xFF is NaN
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PTQ_HD __host__ __device__ __forceinline__
#else
#define PTQ_HD inline
#endif

namespace ptq {

// Reinterpret 32 bits as an IEEE fp32 (no conversion).
PTQ_HD float bits_to_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

PTQ_HD float quiet_nan() { return bits_to_float(0x7FC00000u); }

// IEEE binary16 bits to fp32 (software on the host, one cvt on the device).
PTQ_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("{ .reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(h));
  return f;
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t man = h & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (man << 13));  // Inf/NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // Subnormal: man * 2^-24, exact in fp32.
  const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
#endif
}

// bfloat16 bits to fp32: the upper half of an fp32.
PTQ_HD float bf16_bits_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// Signed INT4 value of the nibble at position i (bits 4i..4i+3) of `word`, minus `offset`
// (8 for symmetric compressed-tensors weights, the unpacked zero point otherwise).
// Exact: 2^23 + u is representable, so the subtraction below is exact.
PTQ_HD float int4_value(uint32_t word, int i, float offset) {
  const uint32_t u = (word >> (4 * i)) & 0xFu;
  return bits_to_float(0x4B000000u | u) - (8388608.0f + offset);
}

// Unpacked 4-bit field number `i` (0..7) of a packed 32-bit word (zero points along N).
PTQ_HD uint32_t nibble(uint32_t word, int i) { return (word >> (4 * i)) & 0xFu; }

// FP4 E2M1 code (low 4 bits) to the fp16 bit pattern of value * 2^-14.
// Placing the 3 magnitude bits at fp16 bits 9..11 makes the fp16 exponent field equal the
// E2M1 exponent field, so both normals and the subnormal (0.5) land exactly, 2^14 apart.
PTQ_HD uint16_t e2m1_to_half_bits_scaled(uint32_t code) {
  return static_cast<uint16_t>(((code & 0x8u) << 12) | ((code & 0x7u) << 9));
}

// FP4 E2M1 code (low 4 bits) to fp32.
PTQ_HD float e2m1_to_float(uint32_t code) {
  return half_bits_to_float(e2m1_to_half_bits_scaled(code)) * 16384.0f;
}

// FP8 E4M3 (fn) code to the fp16 bit pattern of value * 2^-8 (NaN not handled).
// Same idea: fp16 exponent field = E4M3 exponent field, subnormals included.
PTQ_HD uint16_t e4m3_to_half_bits_scaled(uint32_t code) {
  return static_cast<uint16_t>(((code & 0x80u) << 8) | ((code & 0x7Fu) << 7));
}

// FP8 E4M3 (fn) code to fp32, NaN for S.1111.111.
PTQ_HD float e4m3_to_float(uint32_t code) {
  if ((code & 0x7Fu) == 0x7Fu) return quiet_nan();
  return half_bits_to_float(e4m3_to_half_bits_scaled(code)) * 256.0f;
}

// E8M0 scale code to fp32: 2^(x - 127); 0 is 2^-127 (an fp32 subnormal); 0xFF is NaN.
PTQ_HD float e8m0_to_float(uint32_t code) {
  code &= 0xFFu;
  if (code == 0xFFu) return quiet_nan();
  if (code == 0u) return bits_to_float(0x00400000u);
  return bits_to_float(code << 23);
}

}  // namespace ptq
