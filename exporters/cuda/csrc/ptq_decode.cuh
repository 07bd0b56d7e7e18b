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
//   FP6 E2M3 / E3M2 (OCP MX)   bit 5 sign, then 2/3 exponent bits (bias 1/3) and 3/2
//                              mantissa bits; every code finite (no Inf, no NaN)
//   INT3/5/6 (ptq layout)      u in [0, 2^b) stored, value q = u - 2^(b-1) (- zero point)
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

// u - offset for a stored unsigned integer code u < 2^23 and an integer offset (2^(b-1)
// for symmetric weights, 2^(b-1) + zero point otherwise): OR-ing u into the mantissa of
// 2^23 gives the fp32 2^23 + u, so one LOP3 and one FADD decode it, exactly.
// int4_value: the same for the nibble at position i (bits 4i..4i+3) of `word`.
PTQ_HD float int_code_value(uint32_t u, float offset) {
  return bits_to_float(0x4B000000u | u) - (8388608.0f + offset);
}

PTQ_HD float int4_value(uint32_t word, int i, float offset) {
  return int_code_value((word >> (4 * i)) & 0xFu, offset);
}

// Unpacked 4-bit field number `i` (0..7) of a packed 32-bit word (zero points along N).
PTQ_HD uint32_t nibble(uint32_t word, int i) { return (word >> (4 * i)) & 0xFu; }

// Sign-magnitude minifloat ExMy code (1 + kExp + kMan bits, kExp <= 5, kMan <= 10, any
// bias) to the fp16 bit pattern of value * 2^(bias - 15). The magnitude bits go to fp16
// bits 10 - kMan .. 9 + kExp, so the code's exponent field becomes the low bits of the
// fp16 exponent field and its mantissa the top of the fp16 mantissa: a normal code
// 2^(E - bias) (1 + m / 2^kMan) becomes 2^(E - 15) (1 + m / 2^kMan) and a subnormal
// one 2^(1 - bias) m / 2^kMan becomes the fp16 subnormal 2^-14 m / 2^kMan; both are the
// code's value times 2^(bias - 15), exactly. The sign bit goes to fp16 bit 15.
// Used for E2M1 (bias 1), E4M3 (7), FP6 E2M3 (1) and E3M2 (3); infinities and NaN
// codes are not special-cased (the callers handle the ones their format has).
template <int kExp, int kMan>
PTQ_HD uint16_t minifloat_to_half_bits_scaled(uint32_t code) {
  static_assert(kExp >= 1 && kExp <= 5 && kMan >= 0 && kMan <= 10, "does not fit fp16");
  constexpr uint32_t kMag = (1u << (kExp + kMan)) - 1u;
  constexpr uint32_t kSign = 1u << (kExp + kMan);
  return static_cast<uint16_t>(((code & kSign) << (15 - kExp - kMan)) |
                               ((code & kMag) << (10 - kMan)));
}

// FP4 E2M1 code (low 4 bits) to the fp16 bit pattern of value * 2^-14: the 3 magnitude
// bits at fp16 bits 9..11 (both normals and the subnormal 0.5 land exactly).
PTQ_HD uint16_t e2m1_to_half_bits_scaled(uint32_t code) {
  return minifloat_to_half_bits_scaled<2, 1>(code);
}

// FP4 E2M1 code (low 4 bits) to fp32.
PTQ_HD float e2m1_to_float(uint32_t code) {
  return half_bits_to_float(e2m1_to_half_bits_scaled(code)) * 16384.0f;
}

// FP8 E4M3 (fn) code to the fp16 bit pattern of value * 2^-8 (NaN not handled).
PTQ_HD uint16_t e4m3_to_half_bits_scaled(uint32_t code) {
  return minifloat_to_half_bits_scaled<4, 3>(code);
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
