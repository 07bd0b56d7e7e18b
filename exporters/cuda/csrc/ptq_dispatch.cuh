// ptq_dispatch.cuh: host-side launch templates shared by the per-format .cu files.
#pragma once
#include "ptq_gemm.cuh"
#include "ptq_gemv.cuh"

namespace ptq {

inline WeightView make_view(const QLinearArgs& a) {
  int shift = 0;
  while ((1 << shift) < a.group_size) ++shift;
  return WeightView{a.w, a.w_scale, a.w_zero, a.w_global, a.row_scale, a.N, a.K, shift};
}

inline const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <class Fmt, int kAct, int kOut, int BM>
const char* launch_gemm(const QLinearArgs& a, const WeightView& w, cudaStream_t stream) {
  const int k_tiles = a.K / kGemmBK;
  const int split = a.split_k < 1 ? 1 : (a.split_k > k_tiles ? k_tiles : a.split_k);
  const int per = (k_tiles + split - 1) / split;
  const int splits = (k_tiles + per - 1) / per;
  if (splits > 1 && a.workspace == nullptr) return "split-K GEMM needs a zeroed fp32 workspace";
  const dim3 grid((a.N + kGemmBN - 1) / kGemmBN, (a.M + BM - 1) / BM, splits);
  qgemm_kernel<Fmt, kAct, kOut, BM><<<grid, kGemmThreads, 0, stream>>>(a, w, per);
  if (splits > 1) {
    const size_t total = static_cast<size_t>(a.M) * a.N;
    const int blocks = static_cast<int>(total / 256 + 1 < 65535 ? total / 256 + 1 : 65535);
    finalize_kernel<kOut><<<blocks, 256, 0, stream>>>(a);
  }
  return last_error();
}

// GEMV for M <= 8 (specialised for M = 1).
template <class Fmt, int kAct, int kOut>
const char* launch_gemv(const QLinearArgs& a, const WeightView& w, cudaStream_t stream) {
  if (a.M > 8) return "the GEMV takes at most 8 activation rows";
  const int rows_per_block = kGemvWarps * kGemvRows;
  const dim3 grid((a.N + rows_per_block - 1) / rows_per_block);
  if (a.M == 1) {
    qgemv_kernel<Fmt, kAct, kOut, 1><<<grid, kGemvWarps * 32, 0, stream>>>(a, w);
  } else {
    qgemv_kernel<Fmt, kAct, kOut, 8><<<grid, kGemvWarps * 32, 0, stream>>>(a, w);
  }
  return last_error();
}

template <class Fmt, int kAct, int kOut>
const char* launch_typed(const QLinearArgs& a, cudaStream_t stream) {
  const WeightView w = make_view(a);
  if (a.M <= 8) return launch_gemv<Fmt, kAct, kOut>(a, w, stream);
  if (a.M <= 32) return launch_gemm<Fmt, kAct, kOut, 16>(a, w, stream);
  return launch_gemm<Fmt, kAct, kOut, 64>(a, w, stream);
}

// Weight-only (x and out share fp16/bf16) or FP8 activations with fp16/bf16 output.
template <class Fmt>
const char* launch_any_act(const QLinearArgs& a, cudaStream_t stream) {
  if (a.act == kF16 && a.out_kind == kF16) return launch_typed<Fmt, kF16, kF16>(a, stream);
  if (a.act == kBF16 && a.out_kind == kBF16) return launch_typed<Fmt, kBF16, kBF16>(a, stream);
  if (a.act == kFP8 && a.out_kind == kF16) return launch_typed<Fmt, kFP8, kF16>(a, stream);
  if (a.act == kFP8 && a.out_kind == kBF16) return launch_typed<Fmt, kFP8, kBF16>(a, stream);
  return "unsupported (activation, output) dtype pair: need (fp16, fp16), (bf16, bf16), "
         "(fp8, fp16) or (fp8, bf16)";
}

// Weight-only formats whose activations must be fp16/bf16.
template <class Fmt>
const char* launch_weight_only(const QLinearArgs& a, cudaStream_t stream) {
  if (a.act == kF16 && a.out_kind == kF16) return launch_typed<Fmt, kF16, kF16>(a, stream);
  if (a.act == kBF16 && a.out_kind == kBF16) return launch_typed<Fmt, kBF16, kBF16>(a, stream);
  return "this weight format is weight-only: activations and output must be fp16 or bf16";
}

}  // namespace ptq
