// Declarations of the CPU ops bound in csrc/bindings.cpp (one section per csrc/cpu/*.cpp file).
#pragma once
#include <torch/extension.h>

namespace aigc_rt::cpu {
// layernorm.cpp
torch::Tensor layernorm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps);
torch::Tensor add_layernorm(const torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& weight,
                            const torch::Tensor& bias, double eps);

// conv_transpose.cpp
// hidden, as pybind11's own types: the class is bound in bindings.cpp
struct __attribute__((visibility("hidden"))) ConvTransposeWeights {  // ConvTranspose2d weights, repacked once
  torch::Tensor packed;        // weight panels (layout: conv_transpose.cpp)
  torch::Tensor bias;          // (>= C_out,) fp32, zero-padded
  int64_t cin, cout, kernel, stride, padding, output_padding;
  int64_t nv;                  // vectors per panel row
  bool col2im;                 // few output channels: GEMM over input pixels, then col2im
  std::string isa;             // "avx512" or "avx2"
  mutable c10::Storage out_cache, scratch_cache;  // recycled buffers (conv_transpose.cpp: recycled)
};
ConvTransposeWeights conv_transpose_prepare(const torch::Tensor& weight, const torch::Tensor& bias, int64_t stride,
                                            int64_t padding, int64_t output_padding, const std::string& isa);
torch::Tensor conv_transpose(const torch::Tensor& x, const ConvTransposeWeights& weights, const std::string& act);
}  // namespace aigc_rt::cpu
