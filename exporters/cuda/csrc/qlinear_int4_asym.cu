// qlinear_int4_asym.cu: asymmetric INT4 weights (zero points packed along N), group
// scales in the output dtype.
#include "ptq_int4.cuh"

namespace ptq {

const char* launch_int4_asym(const QLinearArgs& a, cudaStream_t stream) {
  return launch_int4_native_scale<true>(a, stream);
}

}  // namespace ptq
