// LayerNorm (fp32), one row per OpenMP task.
//
//   out[r, :] = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias      (biased variance, as torch)
//
// (The residual add before it happens in the epilogue of the linear that produced the sub-layer's output.)
// Two passes over each row (sum for the mean, then the centred sum of squares) keep the variance as
// accurate as torch's Welford for the row lengths we see (C <= 1600).
// It writes into `out` when given (the allocation-free decode step), else into a new tensor.
// Reference: torch.nn.functional.layer_norm. Tests: tests/test_layernorm.py.
#include "common.h"

namespace aigc_rt::cpu {

// the result tensor: `out` (checked: in's shape, fp32, contiguous, not overlapping `in`) or a new one
static torch::Tensor output_like(const torch::Tensor& in, const c10::optional<torch::Tensor>& out, const char* op) {
  if (!out) return torch::empty_like(in);
  AIGC_CHECK_CPU_CONTIGUOUS(*out, torch::kFloat32);
  AIGC_CHECK(out->sizes() == in.sizes(), op, ": out has shape ", out->sizes(), ", expected ", in.sizes());
  AIGC_CHECK(!overlap(*out, in), op, ": out must not overlap its input");
  return *out;
}

static void layernorm_row(const float* h, const float* w, const float* b, float* out, int64_t C, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < C; ++c) sum += h[c];
  const float mean = sum / C;
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < C; ++c) sq += (h[c] - mean) * (h[c] - mean);
  const float rstd = 1.f / std::sqrt(sq / C + eps);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = (h[c] - mean) * rstd * w[c] + b[c];
}

// out = layernorm(x) ; shapes (..., C)
torch::Tensor layernorm(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, double eps,
                        const c10::optional<torch::Tensor>& out_) {
  AIGC_CHECK_CPU_CONTIGUOUS(x, torch::kFloat32);
  AIGC_CHECK_CPU_CONTIGUOUS(weight, torch::kFloat32);
  AIGC_CHECK_CPU_CONTIGUOUS(bias, torch::kFloat32);
  const int64_t C = x.size(-1);
  AIGC_CHECK(weight.numel() == C && bias.numel() == C, "layernorm: weight/bias have ", weight.numel(), "/",
             bias.numel(), " elements, expected ", C);
  auto out = output_like(x, out_, "layernorm");
  const int64_t rows = x.numel() / std::max<int64_t>(C, 1);
  const float *px = x.data_ptr<float>(), *pw = weight.data_ptr<float>(), *pb = bias.data_ptr<float>();
  float* po = out.data_ptr<float>();
#pragma omp parallel for schedule(static) if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) layernorm_row(px + r * C, pw, pb, po + r * C, C, (float)eps);
  return out;
}

}  // namespace aigc_rt::cpu
