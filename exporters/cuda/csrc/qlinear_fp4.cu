// qlinear_fp4.cu: NVFP4 and MXFP4 (E2M1 codes) weights, weight-only or W4A8 (FP8 acts).
#include "ptq_dispatch.cuh"

namespace ptq {

const char* launch_fp4(const QLinearArgs& a, cudaStream_t stream) {
  if (a.wformat == kWNvfp4) return launch_any_act<Fp4Format<true>>(a, stream);
  return launch_any_act<Fp4Format<false>>(a, stream);
}

}  // namespace ptq
