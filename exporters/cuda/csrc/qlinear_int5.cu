// qlinear_int5.cu: INT5 bit-stream weights (ptq layout), symmetric or asymmetric; GEMV.
#include "ptq_bitstream_launch.cuh"

namespace ptq {

const char* launch_int5(const QLinearArgs& a, cudaStream_t stream) {
  return launch_int_bits<5>(a, stream, a.wformat == kWInt5Asym);
}

}  // namespace ptq
