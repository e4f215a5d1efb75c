// Declarations of the CPU ops bound in csrc/bindings.cpp (one section per csrc/cpu/*.cpp file).
#pragma once
#include <torch/extension.h>

namespace aigc_rt::cpu {
// layernorm.cpp
torch::Tensor layernorm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps,
                        const c10::optional<torch::Tensor>& out);
torch::Tensor add_layernorm(const torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& weight,
                            const torch::Tensor& bias, double eps, const c10::optional<torch::Tensor>& out);
// linear.cpp
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                     const c10::optional<torch::Tensor>& scale, bool gelu, const c10::optional<torch::Tensor>& out);
torch::Tensor pack_int8(const torch::Tensor& q);
std::string linear_isa(const std::string& weight_dtype);
void set_linear_isa(const std::string& cap);
// embedding.cpp
torch::Tensor embedding(const torch::Tensor& table, const torch::Tensor& ids, const c10::optional<torch::Tensor>& scale,
                        const c10::optional<torch::Tensor>& out);
}  // namespace aigc_rt::cpu
