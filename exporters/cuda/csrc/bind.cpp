// bind.cpp: Python binding of the quantized-linear launcher.
//
// Python (exporters/cuda/ops.py) validates the tensors and passes raw device pointers and
// the current CUDA stream as integers, so this file needs no ATen and stays tiny.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ptq_launch.h"

namespace {

template <typename T>
T* ptr(std::int64_t p) {
  return reinterpret_cast<T*>(static_cast<std::intptr_t>(p));
}

void qlinear(int wformat, int act, int out_kind, int scale_kind, std::int64_t x,
             std::int64_t x_scale, std::int64_t w, std::int64_t w_scale, std::int64_t w_zero,
             std::int64_t w_global, std::int64_t row_scale, std::int64_t bias, std::int64_t out,
             std::int64_t workspace, int M, int N, int K, int group_size, int num_sms,
             int split_k, std::int64_t stream) {
  ptq::QLinearArgs a{};
  a.x = ptr<const void>(x);
  a.x_scale = ptr<const float>(x_scale);
  a.w = ptr<const void>(w);
  a.w_scale = ptr<const void>(w_scale);
  a.w_zero = ptr<const std::uint32_t>(w_zero);
  a.w_global = ptr<const float>(w_global);
  a.row_scale = ptr<const float>(row_scale);
  a.bias = ptr<const void>(bias);
  a.out = ptr<void>(out);
  a.workspace = ptr<float>(workspace);
  a.M = M;
  a.N = N;
  a.K = K;
  a.group_size = group_size;
  a.wformat = wformat;
  a.act = act;
  a.out_kind = out_kind;
  a.scale_kind = scale_kind;
  a.num_sms = num_sms;
  a.split_k = split_k;
  const char* err = ptq::ptq_qlinear(a, ptr<CUstream_st>(stream));
  if (err != nullptr) throw std::runtime_error(std::string("ptq qlinear: ") + err);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ptq quantized-linear CUDA kernels (GEMV for M <= 8, mma.sync GEMM otherwise)";
  m.def("qlinear", &qlinear, "Launch y = x @ dequant(W)^T (+ bias) on the given stream");
}
