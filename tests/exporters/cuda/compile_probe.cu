// compile_probe.cu: a small translation unit for the fast compile-only test: one GEMV
// (INT4, fp16, batch 1) and one GEMM (NVFP4 weights x FP8 activations, bf16 mma and out).
#include "ptq_dispatch.cuh"

namespace ptq {

template __global__ void qgemv_kernel<Int4Format<kScaleF16, false>, kF16, kF16, 1>(
    const QLinearArgs, const WeightView);
template __global__ void qgemm_kernel<Fp4Format<true>, kFP8, kBF16, 16>(const QLinearArgs,
                                                                       const WeightView, int);

}  // namespace ptq
