// qlinear_int4.cu: INT4 (pack-quantized) entry point and the symmetric variant with
// group scales in the output dtype.
#include "ptq_int4.cuh"

namespace ptq {

const char* launch_int4(const QLinearArgs& a, cudaStream_t stream) {
  const bool f32 = a.scale_kind == kScaleF32;
  if (a.wformat == kWInt4Asym) {
    return f32 ? launch_int4_asym_f32(a, stream) : launch_int4_asym(a, stream);
  }
  return f32 ? launch_int4_sym_f32(a, stream) : launch_int4_native_scale<false>(a, stream);
}

}  // namespace ptq
