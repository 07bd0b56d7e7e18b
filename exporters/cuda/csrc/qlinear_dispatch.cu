// qlinear_dispatch.cu: argument checks shared by every format, then the format launcher.
#include "ptq_launch.h"

namespace ptq {
namespace {

// The bit-stream formats: GEMV only; a 32-code chunk (b whole words) lies in one group.
const char* launch_bitstream(const QLinearArgs& a, cudaStream_t stream) {
  if (a.M > 8) return "bit-stream formats have a GEMV only: at most 8 activation rows";
  const bool pow2 = a.group_size >= 32 && (a.group_size & (a.group_size - 1)) == 0;
  if (!pow2 || a.K % a.group_size != 0) {
    return "bit-stream group size must be a power of two >= 32 that divides K";
  }
  if (a.w_scale == nullptr) return "bit-stream formats need weight_scale";
  switch (a.wformat) {
    case kWInt3:
    case kWInt3Asym:
      if (a.wformat == kWInt3Asym && a.w_zero == nullptr) return "asymmetric INT3 needs zeros";
      return launch_int3(a, stream);
    case kWInt5:
    case kWInt5Asym:
      if (a.wformat == kWInt5Asym && a.w_zero == nullptr) return "asymmetric INT5 needs zeros";
      return launch_int5(a, stream);
    case kWInt6:
    case kWInt6Asym:
      if (a.wformat == kWInt6Asym && a.w_zero == nullptr) return "asymmetric INT6 needs zeros";
      return launch_int6(a, stream);
    default:
      return launch_fp6(a, stream);
  }
}

}  // namespace

const char* ptq_qlinear(const QLinearArgs& a, cudaStream_t stream) {
  if (a.M < 1 || a.N < 1 || a.K < 1) return "M, N and K must be positive";
  if (a.K % 32 != 0) return "K must be a multiple of 32 for the CUDA kernels";
  if (a.x == nullptr || a.w == nullptr || a.out == nullptr) return "null x, weight or out";
  const bool pow2 = a.group_size >= 8 && (a.group_size & (a.group_size - 1)) == 0;
  switch (a.wformat) {
    case kWInt4:
    case kWInt4Asym:
      if (!pow2 || a.K % a.group_size != 0) {
        return "INT4 group size must be a power of two >= 8 that divides K";
      }
      if (a.w_scale == nullptr) return "INT4 needs weight_scale";
      if (a.wformat == kWInt4Asym && a.w_zero == nullptr) return "asymmetric INT4 needs zeros";
      return launch_int4(a, stream);
    case kWNvfp4:
      if (a.w_scale == nullptr || a.w_global == nullptr) return "NVFP4 needs scale and global";
      return launch_fp4(a, stream);
    case kWMxfp4:
      if (a.w_scale == nullptr) return "MXFP4 needs weight_scale";
      return launch_fp4(a, stream);
    case kWInt8:
    case kWFp8:
      if (a.row_scale == nullptr) return "INT8/FP8 weights need per-channel scales";
      return launch_byte8(a, stream);
    case kWInt3:
    case kWInt3Asym:
    case kWInt5:
    case kWInt5Asym:
    case kWInt6:
    case kWInt6Asym:
    case kWFp6E2M3:
    case kWFp6E3M2:
      return launch_bitstream(a, stream);
    default:
      return "unknown weight format";
  }
}

}  // namespace ptq
