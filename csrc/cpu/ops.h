// Declarations of the CPU ops bound in csrc/bindings.cpp (one section per csrc/cpu/*.cpp file).
#pragma once
#include <torch/extension.h>

namespace aigc_rt::cpu {
// layernorm.cpp
torch::Tensor layernorm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps);
torch::Tensor add_layernorm(const torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& weight,
                            const torch::Tensor& bias, double eps);
}  // namespace aigc_rt::cpu
