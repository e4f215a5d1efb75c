// Declarations of the CPU ops bound in csrc/bindings.cpp (one section per csrc/cpu/*.cpp file).
#pragma once
#include <torch/extension.h>

namespace aigc_rt::cpu {
// layernorm.cpp
torch::Tensor layernorm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps);
torch::Tensor add_layernorm(const torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& weight,
                            const torch::Tensor& bias, double eps);

// attention.cpp, sampling.cpp, vec.cpp (cpu-attn)
torch::Tensor attention_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& lengths, int64_t max_len, const std::optional<torch::Tensor>& out,
                               int64_t splits);
torch::Tensor attention_prefill(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const std::optional<torch::Tensor>& out);
torch::Tensor sample(const torch::Tensor& logits, bool do_sample, double temperature, int64_t top_k, double top_p,
                     double repetition_penalty, const torch::Tensor& u, const std::optional<torch::Tensor>& seen,
                     const std::optional<torch::Tensor>& out);
std::string simd_isa();
std::string set_simd_isa(const std::string& name);
}  // namespace aigc_rt::cpu
