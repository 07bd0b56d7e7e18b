// ptq_gemm.cuh: tensor-core GEMM for batch > 8 with in-register weight dequantization.
//
// Block tile BM x 128 (outputs) x 32 (K step), 4 warps. Each K step:
//   * activations [BM, 32] go to shared memory in the compute type CT (fp16 or bf16;
//     FP8 E4M3 activations are widened to fp16/bf16 exactly on the way);
//   * thread t decodes the 32 K-elements of weight row n0 + t (one 128-bit load for
//     4-bit formats, two for 8-bit) to fp32, applies the group scale, rounds to CT and
//     stores them to shared memory as B[n][k] (k contiguous = the ".col" B operand);
//   * warps run mma.sync.m16n8k16 (fp32 accumulate) on fragments read from shared memory
//     with the PTX fragment layout (rows padded by 8 elements: no bank conflicts).
// Split-K (gridDim.z > 1) adds fp32 partials into a zeroed workspace with atomics; the
// finalize kernel then adds the bias and converts. Native FP8 mma (sm_89+ m16n8k32 e4m3),
// ldmatrix and cp.async pipelining are future work (see LAYOUT.md).
#pragma once
#include "ptq_act.cuh"

namespace ptq {

constexpr int kGemmBN = 128;
constexpr int kGemmBK = 32;
constexpr int kGemmThreads = 128;

template <typename CT>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<CT, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#else
  __trap();  // sm_80 or newer only
#endif
}

template <class Fmt, int kAct, int kOut, int BM>
__global__ void __launch_bounds__(kGemmThreads)
    qgemm_kernel(const QLinearArgs a, const WeightView w, const int k_tiles_per_split) {
  using CT = typename ComputeType<kAct, kOut>::type;
  constexpr int BN = kGemmBN, BK = kGemmBK, LDS = BK + 8;
  constexpr int E = Fmt::kElemsPerVec;
  constexpr int WARPS_M = BM >= 64 ? 2 : 1;
  constexpr int WARPS_N = 4 / WARPS_M;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MT = WM / 16, NT = WN / 8;
  static_assert(MT >= 1 && NT >= 1 && BK % E == 0, "bad tile");

  __shared__ alignas(16) CT As[BM * LDS];
  __shared__ alignas(16) CT Bs[BN * LDS];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int kt_begin = blockIdx.z * k_tiles_per_split;
  const int kt_end = min(kt_begin + k_tiles_per_split, a.K / BK);

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int kb = kt * BK;
    for (int idx = tid; idx < BM * (BK / 8); idx += kGemmThreads) {
      const int r = idx / (BK / 8), c = idx % (BK / 8), m = m0 + r;
      const uint4 v = m < a.M ? load_act8_ct<kAct, CT>(a.x, static_cast<size_t>(m) * a.K + kb + 8 * c)
                              : make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(&As[r * LDS + 8 * c]) = v;
    }
    {
      const int n = n0 + tid;  // kGemmThreads == BN: one weight row per thread
#pragma unroll
      for (int vi = 0; vi < BK / E; ++vi) {
        typename Fmt::Vec pv{};
        if (n < a.N) pv = Fmt::load_vec(w, n, kb / E + vi);
#pragma unroll
        for (int j = 0; j < E / 8; ++j) {
          float q[8];
          uint4 packed = make_uint4(0u, 0u, 0u, 0u);
          if (n < a.N) {
            const float s = Fmt::chunk(w, pv, n, kb + vi * E, j, q);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
              if constexpr (Fmt::kValueScale != 1.0f) q[i] *= Fmt::kValueScale;  // exact
              q[i] *= s;
            }
            packed = pack8<CT>(q);
          }
          *reinterpret_cast<uint4*>(&Bs[tid * LDS + vi * E + 8 * j]) = packed;
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t af[MT][4], bfr[NT][2];
      const int col = kk + (lane & 3) * 2;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = wm * WM + mt * 16 + (lane >> 2);
        af[mt][0] = *reinterpret_cast<const uint32_t*>(&As[row * LDS + col]);
        af[mt][1] = *reinterpret_cast<const uint32_t*>(&As[(row + 8) * LDS + col]);
        af[mt][2] = *reinterpret_cast<const uint32_t*>(&As[row * LDS + col + 8]);
        af[mt][3] = *reinterpret_cast<const uint32_t*>(&As[(row + 8) * LDS + col + 8]);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int nr = wn * WN + nt * 8 + (lane >> 2);
        bfr[nt][0] = *reinterpret_cast<const uint32_t*>(&Bs[nr * LDS + col]);
        bfr[nt][1] = *reinterpret_cast<const uint32_t*>(&Bs[nr * LDS + col + 8]);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) mma_16816<CT>(acc[mt][nt], af[mt], bfr[nt]);
    }
    __syncthreads();
  }

  const bool split = gridDim.z > 1;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int m = m0 + wm * WM + mt * 16 + (lane >> 2) + (r >= 2 ? 8 : 0);
        const int n = n0 + wn * WN + nt * 8 + (lane & 3) * 2 + (r & 1);
        if (m >= a.M || n >= a.N) continue;
        float v = finish<Fmt, kAct>(a, w, m, n, acc[mt][nt][r]);
        const size_t o = static_cast<size_t>(m) * a.N + n;
        if (split) {
          atomicAdd(a.workspace + o, v);
        } else {
          if (a.bias != nullptr) v += load_out_scalar<kOut>(a.bias, n);
          store_out<kOut>(a.out, o, v);
        }
      }
    }
  }
}

// out = workspace + bias, converted to the output type (after a split-K GEMM).
template <int kOut>
__global__ void finalize_kernel(const QLinearArgs a) {
  const size_t total = static_cast<size_t>(a.M) * a.N;
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    float v = a.workspace[i];
    if (a.bias != nullptr) v += load_out_scalar<kOut>(a.bias, i % a.N);
    store_out<kOut>(a.out, i, v);
  }
}

}  // namespace ptq
