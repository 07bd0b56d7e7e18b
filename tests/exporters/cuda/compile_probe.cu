// compile_probe.cu: a small translation unit for the fast compile-only test: one GEMV
// (INT4, fp16, batch 1), one mma GEMM (NVFP4 weights x FP8 activations, bf16 mma and
// out) and one bit-stream GEMV (asymmetric INT5 with bf16 scales, batch <= 8).
#include "ptq_bitstream_launch.cuh"

namespace ptq {

template __global__ void qgemv_kernel<Int4Format<kScaleF16, false>, kF16, kF16, 1>(
    const QLinearArgs, const WeightView);
template __global__ void qgemm_kernel<Fp4Format<true>, kFP8, kBF16, 16>(const QLinearArgs,
                                                                       const WeightView, int);
template __global__ void qgemv_kernel<IntBitsFormat<5, kScaleBF16, true>, kBF16, kBF16, 8>(
    const QLinearArgs, const WeightView);

}  // namespace ptq
