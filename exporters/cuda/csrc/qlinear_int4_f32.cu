// qlinear_int4_f32.cu: symmetric INT4 weights with fp32 group scales.
#include "ptq_int4.cuh"

namespace ptq {

const char* launch_int4_sym_f32(const QLinearArgs& a, cudaStream_t stream) {
  return launch_any_act<Int4Format<kScaleF32, false>>(a, stream);
}

}  // namespace ptq
