// qlinear_int6.cu: INT6 bit-stream weights (ptq layout), symmetric or asymmetric; GEMV.
#include "ptq_bitstream_launch.cuh"

namespace ptq {

const char* launch_int6(const QLinearArgs& a, cudaStream_t stream) {
  return launch_int_bits<6>(a, stream, a.wformat == kWInt6Asym);
}

}  // namespace ptq
