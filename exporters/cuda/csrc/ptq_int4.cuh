// ptq_int4.cuh: INT4 launch templates. The four variants (symmetric or not, fp32 or
// output-dtype group scales) live in four translation units so ninja compiles them in
// parallel; qlinear_int4.cu dispatches between them.
#pragma once
#include "ptq_dispatch.cuh"

namespace ptq {

const char* launch_int4_sym_f32(const QLinearArgs& a, cudaStream_t stream);
const char* launch_int4_asym(const QLinearArgs& a, cudaStream_t stream);
const char* launch_int4_asym_f32(const QLinearArgs& a, cudaStream_t stream);

// Group scales in the output dtype (fp16 or bf16).
template <bool kAsym>
const char* launch_int4_native_scale(const QLinearArgs& a, cudaStream_t stream) {
  if (a.scale_kind == kScaleF16 && a.out_kind == kF16) {
    return launch_any_act<Int4Format<kScaleF16, kAsym>>(a, stream);
  }
  if (a.scale_kind == kScaleBF16 && a.out_kind == kBF16) {
    return launch_any_act<Int4Format<kScaleBF16, kAsym>>(a, stream);
  }
  return "INT4 group scales must be fp32 or the output dtype";
}

}  // namespace ptq
