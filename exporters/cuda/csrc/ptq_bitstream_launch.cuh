// ptq_bitstream_launch.cuh: GEMV launch templates of the bit-stream formats (one
// translation unit per element type: qlinear_int3/5/6.cu, qlinear_fp6.cu).
//
// Weight-only (fp16 or bf16 activations and output), M <= 8. Group scales are fp32, E8M0
// codes (uint8) or in the activation dtype (launch.py converts any other dtype to fp32).
#pragma once
#include "ptq_bitstream.cuh"
#include "ptq_dispatch.cuh"

namespace ptq {

template <template <int> class FmtOf, int kAct>
const char* launch_bits_act(const QLinearArgs& a, const WeightView& w, cudaStream_t stream) {
  constexpr int kNative = kAct == kF16 ? kScaleF16 : kScaleBF16;
  if (a.scale_kind == kScaleF32) return launch_gemv<FmtOf<kScaleF32>, kAct, kAct>(a, w, stream);
  if (a.scale_kind == kScaleE8M0) return launch_gemv<FmtOf<kScaleE8M0>, kAct, kAct>(a, w, stream);
  if (a.scale_kind == kNative) return launch_gemv<FmtOf<kNative>, kAct, kAct>(a, w, stream);
  return "bit-stream group scales must be fp32, E8M0 (uint8) or the activation dtype";
}

template <template <int> class FmtOf>
const char* launch_bits(const QLinearArgs& a, cudaStream_t stream) {
  const WeightView w = make_view(a);
  if (a.act == kF16 && a.out_kind == kF16) return launch_bits_act<FmtOf, kF16>(a, w, stream);
  if (a.act == kBF16 && a.out_kind == kBF16) return launch_bits_act<FmtOf, kBF16>(a, w, stream);
  return "bit-stream formats are weight-only: activations and output must be fp16 or bf16";
}

template <int kBits>
struct IntBitsOf {
  template <int kScale>
  using Sym = IntBitsFormat<kBits, kScale, false>;
  template <int kScale>
  using Asym = IntBitsFormat<kBits, kScale, true>;
};

// Signed INT of kBits bits, symmetric or with int8 zero points.
template <int kBits>
const char* launch_int_bits(const QLinearArgs& a, cudaStream_t stream, bool asym) {
  if (asym) return launch_bits<IntBitsOf<kBits>::template Asym>(a, stream);
  return launch_bits<IntBitsOf<kBits>::template Sym>(a, stream);
}

}  // namespace ptq
