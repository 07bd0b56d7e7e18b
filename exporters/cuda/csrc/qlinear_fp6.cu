// qlinear_fp6.cu: FP6 E2M3 and E3M2 bit-stream weights (ptq layout, MXFP6 with E8M0
// scales or any group scale); GEMV.
#include "ptq_bitstream_launch.cuh"

namespace ptq {
namespace {

template <int kScale>
using E2M3 = Fp6Format<2, 3, kScale>;
template <int kScale>
using E3M2 = Fp6Format<3, 2, kScale>;

}  // namespace

const char* launch_fp6(const QLinearArgs& a, cudaStream_t stream) {
  if (a.wformat == kWFp6E2M3) return launch_bits<E2M3>(a, stream);
  return launch_bits<E3M2>(a, stream);
}

}  // namespace ptq
