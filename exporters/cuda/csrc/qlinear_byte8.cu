// qlinear_byte8.cu: INT8 and FP8 E4M3 per-channel weights. INT8 is weight-only; FP8
// serves weight-only (fp16/bf16 activations) and W8A8 (FP8 activations, per-token scales).
#include "ptq_dispatch.cuh"

namespace ptq {

const char* launch_byte8(const QLinearArgs& a, cudaStream_t stream) {
  if (a.wformat == kWFp8) return launch_any_act<Byte8Format<true>>(a, stream);
  return launch_weight_only<Byte8Format<false>>(a, stream);
}

}  // namespace ptq
