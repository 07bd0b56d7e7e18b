// ptq_launch.h: the torch-free host interface of the quantized-linear kernels.
//
// bind.cpp (the Python binding) fills a QLinearArgs with raw device pointers and calls
// ptq_qlinear(); the launchers pick GEMV (M <= 8) or the mma.sync GEMM (M > 8).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace ptq {

// Weight formats (keep in sync with exporters/cuda/launch.py WFORMAT_CODES).
enum WFormat : int {
  kWInt4 = 0,      // pack-quantized INT4, symmetric
  kWInt4Asym = 1,  // pack-quantized INT4 with packed zero points
  kWNvfp4 = 2,     // nvfp4-pack-quantized
  kWMxfp4 = 3,     // mxfp4-pack-quantized
  kWInt8 = 4,      // int8 per-channel
  kWFp8 = 5,       // float8_e4m3fn per-channel
  // ptq-layout bit streams (GEMV only): signed INT3/5/6, symmetric or with int8 zero
  // points, and FP6 (OCP E2M3 / E3M2).
  kWInt3 = 6,
  kWInt3Asym = 7,
  kWInt5 = 8,
  kWInt5Asym = 9,
  kWInt6 = 10,
  kWInt6Asym = 11,
  kWFp6E2M3 = 12,
  kWFp6E3M2 = 13,
};

// Element types of activations and outputs.
enum DKind : int { kF16 = 0, kBF16 = 1, kFP8 = 2, kF32 = 3 };

struct QLinearArgs {
  const void* x;            // activations [M, K] (fp16/bf16, or fp8 e4m3 for W4A8/W8A8)
  const float* x_scale;     // per-token activation scales [M] (fp8 activations only)
  const void* w;            // packed weights
  const void* w_scale;      // group scales (INT4 / FP4 / bit streams)
  const uint32_t* w_zero;   // asymmetric zero points (INT4 packed int32; bit streams int8)
  const float* w_global;    // NVFP4 global scale [1]
  const float* row_scale;   // per-channel scales [N] (INT8 / FP8)
  const void* bias;         // [N] in the output dtype, or nullptr
  void* out;                // [M, N] in the output dtype
  float* workspace;         // zeroed fp32 [M, N] for split-K, or nullptr
  int M, N, K;
  int group_size;
  int wformat;              // WFormat
  int act;                  // DKind of x
  int out_kind;             // DKind of out (kF16 / kBF16)
  int scale_kind;           // ScaleKind of INT4 and bit-stream group scales
  int num_sms;              // multiprocessors of the device (split-K heuristic)
  int split_k;              // GEMM K splits (>= 1); > 1 accumulates in `workspace`
};

// Returns nullptr on success, otherwise a static message naming the unsupported input.
const char* ptq_qlinear(const QLinearArgs& args, cudaStream_t stream);

// Per-format launchers (one translation unit each, compiled in parallel).
const char* launch_int4(const QLinearArgs& args, cudaStream_t stream);
const char* launch_fp4(const QLinearArgs& args, cudaStream_t stream);
const char* launch_byte8(const QLinearArgs& args, cudaStream_t stream);
const char* launch_int3(const QLinearArgs& args, cudaStream_t stream);
const char* launch_int5(const QLinearArgs& args, cudaStream_t stream);
const char* launch_int6(const QLinearArgs& args, cudaStream_t stream);
const char* launch_fp6(const QLinearArgs& args, cudaStream_t stream);


}  // namespace ptq
