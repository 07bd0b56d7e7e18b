// ptq_gemv.cuh: weight-only / W4A8 GEMV for batch 1..8 (decode), memory bound.
//
// One warp per kGemvRows output rows; lane l reads the weight vectors l, l + 32, ... of
// each of its rows (128-bit vectors: a warp reads 512 contiguous bytes per row and step;
// bit-stream chunks of b words: 128 b contiguous bytes), kUnroll vectors per row in
// flight before any is decoded. Two rows per warp
// halve the activation reads (each x chunk serves both rows) and double the bytes in
// flight. Measured on an H200 (benchmarks/results/gpu_kernels_h200.md): batch 1 is bound
// by latency (warps stall on the L1 loads of x and of the group scales), not by issue
// or DRAM; staging x ahead of the weights is the next step.
// Each 8-element chunk is decoded to fp32, dotted with the activations in fp32 and scaled
// once by its group scale (and the format's power-of-two kValueScale, exactly):
//     acc[r][m] += s_g * (kValueScale * sum_i q_i * x[m, k + i])
// (INT4 with fp16/bf16 activations instead decodes and multiplies two weights per
// instruction in half2, ptq_half2.cuh), then the warp reduces acc with shuffles and
// lane 0 applies the per-row epilogue (per-channel scale, 1/global, per-token activation
// scale) and the bias.
#pragma once
#include "ptq_act.cuh"
#include "ptq_half2.cuh"

namespace ptq {

constexpr int kGemvWarps = 4;
constexpr int kGemvRows = 2;  // output rows per warp

template <class Fmt, int kAct, int kOut, int kMaxM>
__global__ void __launch_bounds__(kGemvWarps * 32)
    qgemv_kernel(const QLinearArgs a, const WeightView w) {
  constexpr int E = Fmt::kElemsPerVec;
  constexpr int kUnroll = 4;
  constexpr int R = kGemvRows;
  const int lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * kGemvWarps + (threadIdx.x >> 5)) * R;
  if (n0 >= a.N) return;
  const int nvec = a.K / E;
  const int M = a.M;
  float acc[R][kMaxM];
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) acc[r][m] = 0.0f;
  }

  for (int base = lane; base < nvec; base += 32 * kUnroll) {
    typename Fmt::Vec v[R][kUnroll];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      // A missing last row (odd N) re-reads row n0; its result is never stored.
      const int n = n0 + r < a.N ? n0 + r : n0;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int vi = base + 32 * u;
        v[r][u] = vi < nvec ? Fmt::load_vec(w, n, vi) : typename Fmt::Vec{};
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int vi = base + 32 * u;
      if (vi >= nvec) break;
      const int k0 = vi * E;
#pragma unroll
      for (int j = 0; j < E / 8; ++j) {
        const size_t kx = static_cast<size_t>(k0 + 8 * j);
        if constexpr (Fmt::kHalf2Dot && kAct != kFP8) {
          // Packed path (ptq_half2.cuh): 16-bit products, fp32 accumulation per chunk.
          ScaleZero p[R];
          uint32_t bias2[R];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            p[r] = Fmt::group_params(w, n0 + r < a.N ? n0 + r : n0, k0 + 8 * j);
            bias2[r] = Half2Ops<kAct>::bias(p[r].zero);
          }
#pragma unroll
          for (int m = 0; m < kMaxM; ++m) {
            if (m < M) {
              const uint4 xv = __ldg(reinterpret_cast<const uint4*>(
                  static_cast<const uint16_t*>(a.x) + static_cast<size_t>(m) * a.K + kx));
#pragma unroll
              for (int r = 0; r < R; ++r) {
                const float d = int4_dot8_half2<kAct>(v[r][u].w[j], xv, bias2[r]);
                acc[r][m] = fmaf(d, 8.0f * p[r].scale, acc[r][m]);
              }
            }
          }
        } else {
          float q[R][8];
          float s[R];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            s[r] = Fmt::chunk(w, v[r][u], n0 + r < a.N ? n0 + r : n0, k0, j, q[r]);
          }
#pragma unroll
          for (int m = 0; m < kMaxM; ++m) {
            if (m < M) {
              float x[8];
              load_act8<kAct>(a.x, static_cast<size_t>(m) * a.K + kx, x);
#pragma unroll
              for (int r = 0; r < R; ++r) {
                float d = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; ++i) d = fmaf(q[r][i], x[i], d);
                if constexpr (Fmt::kValueScale != 1.0f) d *= Fmt::kValueScale;  // exact
                acc[r][m] = fmaf(d, s[r], acc[r][m]);
              }
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        acc[r][m] += __shfl_xor_sync(0xFFFFFFFFu, acc[r][m], off);
      }
    }
  }
  if (lane != 0) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int n = n0 + r;
    if (n >= a.N) break;
#pragma unroll
    for (int m = 0; m < kMaxM; ++m) {
      if (m < M) {
        float out = finish<Fmt, kAct>(a, w, m, n, acc[r][m]);
        if (a.bias != nullptr) out += load_out_scalar<kOut>(a.bias, n);
        store_out<kOut>(a.out, static_cast<size_t>(m) * a.N + n, out);
      }
    }
  }
}

}  // namespace ptq
