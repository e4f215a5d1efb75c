// StepProgram (declared in ops.h): a decode step as the list of cpu ops it ran, replayed by one call.
//
// The cpu backend records a model's decode step while running it once on static buffers (the step's inputs,
// its Workspace and the KV cache); each recorded op holds the tensors it was called with, so a replay reads and
// writes exactly where the recorded step did. A replay runs the same C++ ops, argument checks included, without
// going back to Python between them (~100 calls per GPT-2 124M step) and without holding the GIL. The only
// value that changes between replays is max_len, the bound attention_decode splits its work by.
// Tests: tests/test_gpt2.py (replay == the eager step, a stray torch op refused while recording).
#include "common.h"
#include "cpu/ops.h"

namespace aigc_rt::cpu {

void StepProgram::embedding(const torch::Tensor& table, const torch::Tensor& ids,
                            const c10::optional<torch::Tensor>& scale, const torch::Tensor& out,
                            const c10::optional<torch::Tensor>& pos_table,
                            const c10::optional<torch::Tensor>& positions) {
  ops_.push_back([=](int64_t) { cpu::embedding(table, ids, scale, out, pos_table, positions); });
}

void StepProgram::layernorm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                            double eps, const torch::Tensor& out) {
  ops_.push_back([=](int64_t) { cpu::layernorm(x, weight, bias, eps, out); });
}

void StepProgram::linear(const torch::Tensor& x, const PackedLinear& w, int64_t act, const torch::Tensor& out,
                         const c10::optional<torch::Tensor>& residual) {
  ops_.push_back([=](int64_t) { cpu::linear(x, w, act, out, residual); });
}

void StepProgram::write_kv(const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& positions,
                           const torch::Tensor& k, const torch::Tensor& v) {
  ops_.push_back([=, kc = k_cache, vc = v_cache](int64_t) mutable { cpu::write_kv(kc, vc, positions, k, v); });
}

void StepProgram::attention_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                   const torch::Tensor& lengths, const torch::Tensor& out) {
  ops_.push_back([=](int64_t max_len) { cpu::attention_decode(q, k_cache, v_cache, lengths, max_len, out, 0); });
}

void StepProgram::lstm_cell(const torch::Tensor& gates, const torch::Tensor& c, const torch::Tensor& h_out,
                            const torch::Tensor& c_out) {
  ops_.push_back([=](int64_t) { cpu::lstm_cell(gates, c, h_out, c_out); });
}

void StepProgram::run(int64_t max_len) const {
  for (const auto& op : ops_) op(max_len);
}

}  // namespace aigc_rt::cpu
