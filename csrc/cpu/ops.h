// Declarations of the CPU ops bound in csrc/bindings.cpp (one section per csrc/cpu/*.cpp file).
#pragma once
#include <torch/extension.h>

namespace aigc_rt::cpu {
// layernorm.cpp
torch::Tensor layernorm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps,
                        const c10::optional<torch::Tensor>& out);
// linear.cpp
// A linear layer's weight repacked once for the kernels (panels of 16 rows, csrc/cpu/linear.h), with its bias and,
// for int8, its per-row scale (int4: per row and block of 64 inputs, packed into the weight). (Hidden like the
// pybind11 types that wrap it.)
struct __attribute__((visibility("hidden"))) PackedLinear {
  PackedLinear(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
               const c10::optional<torch::Tensor>& scale);
  std::string dtype() const;  // "fp32", "bf16", "int8", "int4"
  torch::Tensor weight;
  c10::optional<torch::Tensor> bias, scale;  // (out,) fp32; int4: none (its scales are packed into `weight`)
  int64_t in_features = 0, out_features = 0;
  bool int4 = false;  // weight holds int4 blocks (linear.h), from uint8 nibble pairs (out, in / 2) and their scales
};
// y = act(x W^T * scale + bias) into out (or a new tensor); with a residual, also residual += y (returns y).
// act: one of these codes (aigc_rt/backends/cpu.py ACT_CODES)
constexpr int64_t kActNone = 0, kActGeluTanh = 1, kActRelu = 2;
torch::Tensor linear(const torch::Tensor& x, const PackedLinear& w, int64_t act, const c10::optional<torch::Tensor>& out,
                     const c10::optional<torch::Tensor>& residual);
std::string linear_isa(const std::string& weight_dtype);
void set_linear_isa(const std::string& cap);
// kv_cache.cpp
void write_kv(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& positions, const torch::Tensor& k,
              const torch::Tensor& v);
// lstm.cpp: h_out, c_out = the LSTM cell of gates (N, 4H) and c (N, H); c_out may be c
void lstm_cell(const torch::Tensor& gates, const torch::Tensor& c, const torch::Tensor& h_out,
               const torch::Tensor& c_out);
// vae.cpp: z (S, N, L) = mu + eps * exp(logvar / 2), head (N, 2L) = (mu, logvar), eps (S, N, L); and each image's
// ELBO (N,) from the decoder's logits (S, N, D), the images x (N, D) and head
torch::Tensor vae_reparameterize(const torch::Tensor& head, const torch::Tensor& eps);
torch::Tensor vae_bernoulli_elbo(const torch::Tensor& logits, const torch::Tensor& x, const torch::Tensor& head);
// ... and each sample's Bernoulli log-likelihood (S, N) alone (the importance-weighted bound's)
torch::Tensor vae_bernoulli_log_likelihood(const torch::Tensor& logits, const torch::Tensor& x);
// embedding.cpp
torch::Tensor embedding(const torch::Tensor& table, const torch::Tensor& ids, const c10::optional<torch::Tensor>& scale,
                        const c10::optional<torch::Tensor>& out, const c10::optional<torch::Tensor>& pos_table,
                        const c10::optional<torch::Tensor>& positions);
// step_program.cpp
// A decode step recorded as the list of ops it ran (each with the tensors it read and wrote), replayed by one
// call: the cpu backend's counterpart of a CUDA graph (aigc_rt/backends/cpu.py). Hidden like the pybind11 types.
class __attribute__((visibility("hidden"))) StepProgram {
 public:
  void embedding(const torch::Tensor& table, const torch::Tensor& ids, const c10::optional<torch::Tensor>& scale,
                 const torch::Tensor& out, const c10::optional<torch::Tensor>& pos_table,
                 const c10::optional<torch::Tensor>& positions);
  void layernorm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps,
                 const torch::Tensor& out);
  void linear(const torch::Tensor& x, const PackedLinear& w, int64_t act, const torch::Tensor& out,
              const c10::optional<torch::Tensor>& residual);
  void write_kv(const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& positions,
                const torch::Tensor& k, const torch::Tensor& v);
  void attention_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                        const torch::Tensor& lengths, const torch::Tensor& out);
  void lstm_cell(const torch::Tensor& gates, const torch::Tensor& c, const torch::Tensor& h_out,
                 const torch::Tensor& c_out);
  void run(int64_t max_len) const;  // every op in the order recorded; max_len goes to attention_decode
  size_t size() const { return ops_.size(); }

 private:
  std::vector<std::function<void(int64_t max_len)>> ops_;
};

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

// conv.cpp
// hidden, as pybind11's own types: the class is bound in bindings.cpp
struct __attribute__((visibility("hidden"))) ConvWeights {  // Conv2d or ConvTranspose2d weights, repacked once
  torch::Tensor packed;        // weight panels (layout: conv.cpp)
  torch::Tensor bias;          // (>= C_out,) fp32, zero-padded
  int64_t cin, cout, kernel, stride, padding, output_padding;
  int64_t nv;                  // vectors per panel row
  bool transposed;             // prepared by conv_transpose_prepare (else conv2d_prepare)
  bool col2im;                 // transposed, few output channels: GEMM over input pixels, then col2im
  bool im2col;                 // conv2d, few input channels: inputs gathered, then one GEMM
  bool bf16;                   // bf16 weights (packed as pairs) and inputs (rounded on the way in), fp32 sums
  std::string isa;             // "avx512" or "avx2"
  mutable c10::Storage out_cache, in_cache;  // recycled buffers (conv.cpp: recycled)
};
ConvWeights conv2d_prepare(const torch::Tensor& weight, const torch::Tensor& bias, int64_t stride, int64_t padding,
                           const std::string& isa);
ConvWeights conv_transpose_prepare(const torch::Tensor& weight, const torch::Tensor& bias, int64_t stride,
                                   int64_t padding, int64_t output_padding, const std::string& isa);
// out_bf16: the output rounded to bf16 (a bfloat16 tensor), for a next layer that rounds its input anyway
torch::Tensor conv2d(const torch::Tensor& x, const ConvWeights& weights, const std::string& act, double slope,
                     bool out_bf16);
torch::Tensor conv_transpose(const torch::Tensor& x, const ConvWeights& weights, const std::string& act,
                             double slope, bool out_bf16);
}  // namespace aigc_rt::cpu
