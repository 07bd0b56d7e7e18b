// qlinear_int3.cu: INT3 bit-stream weights (ptq layout), symmetric or asymmetric; GEMV.
#include "ptq_bitstream_launch.cuh"

namespace ptq {

const char* launch_int3(const QLinearArgs& a, cudaStream_t stream) {
  return launch_int_bits<3>(a, stream, a.wformat == kWInt3Asym);
}

}  // namespace ptq
