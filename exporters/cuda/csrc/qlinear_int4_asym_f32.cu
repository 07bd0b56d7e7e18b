// qlinear_int4_asym_f32.cu: asymmetric INT4 weights with fp32 group scales.
#include "ptq_int4.cuh"

namespace ptq {

const char* launch_int4_asym_f32(const QLinearArgs& a, cudaStream_t stream) {
  return launch_any_act<Int4Format<kScaleF32, true>>(a, stream);
}

}  // namespace ptq
