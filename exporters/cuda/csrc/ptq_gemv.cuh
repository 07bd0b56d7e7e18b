// ptq_gemv.cuh: weight-only / W4A8 GEMV for batch 1..8 (decode), memory bound.
//
// One warp per output row n; lane l reads the 128-bit weight vectors l, l + 32, ... of
// row n (coalesced: a warp reads 512 contiguous bytes per step), kUnroll of them in flight
// before any is decoded. Each 8-element chunk is decoded to fp32, dotted with the
// activations in fp32 and scaled once by its group scale:
//     acc[m] += s_g * sum_i q_i * x[m, k + i]
// then the warp reduces acc with shuffles and lane 0 applies the per-row epilogue
// (per-channel scale, 1/global, per-token activation scale) and the bias.
#pragma once
#include "ptq_act.cuh"

namespace ptq {

constexpr int kGemvWarps = 4;

template <class Fmt, int kAct, int kOut, int kMaxM>
__global__ void __launch_bounds__(kGemvWarps * 32)
    qgemv_kernel(const QLinearArgs a, const WeightView w) {
  constexpr int E = Fmt::kElemsPerVec;
  constexpr int kUnroll = 4;
  const int lane = threadIdx.x & 31;
  const int n = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  if (n >= a.N) return;
  const int nvec = a.K / E;
  const int M = a.M;
  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.0f;

  for (int base = lane; base < nvec; base += 32 * kUnroll) {
    U32x4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int vi = base + 32 * u;
      v[u] = vi < nvec ? Fmt::load_vec(w, n, vi) : U32x4{{0u, 0u, 0u, 0u}};
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int vi = base + 32 * u;
      if (vi >= nvec) break;
      const int k0 = vi * E;
#pragma unroll
      for (int j = 0; j < E / 8; ++j) {
        float q[8];
        const float s = Fmt::chunk(w, v[u], n, k0, j, q);
#pragma unroll
        for (int m = 0; m < kMaxM; ++m) {
          if (m < M) {
            float x[8];
            load_act8<kAct>(a.x, static_cast<size_t>(m) * a.K + k0 + 8 * j, x);
            float d = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) d = fmaf(q[i], x[i], d);
            acc[m] = fmaf(d, s, acc[m]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[m] += __shfl_xor_sync(0xFFFFFFFFu, acc[m], off);
  }
  if (lane != 0) return;
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m < M) {
      float r = finish<Fmt, kAct>(a, w, m, n, acc[m]);
      if (a.bias != nullptr) r += load_out_scalar<kOut>(a.bias, n);
      store_out<kOut>(a.out, static_cast<size_t>(m) * a.N + n, r);
    }
  }
}

}  // namespace ptq
