// Token sampling over logits (B, V) fp32, one uniform u per row, with exactly the semantics of
// aigc_rt/sampling.py `sample_reference` (Hugging Face's, see its docstring), without sorting the vocabulary:
//   -1 for a row with NaN/inf logits;
//   z = repetition penalty on seen tokens (x < 0 ? x * penalty : x / penalty);
//   greedy: the first index of max z;
//   else z /= temperature; top-k keeps z >= the k-th largest (ties kept) - one pass with a candidate buffer
//   and nth_element; w = exp(z - max z) over the kept tokens; top-p keeps w >= t, the smallest t with
//   sum(w > t) < top_p * sum(w) - a weighted quickselect over the candidates; then the token is the first id,
//   in vocabulary order, whose running sum of kept w exceeds u * sum(kept w).
// OpenMP over rows; per-thread scratch (scratch.h), so no allocation per call after the first.
// Body: sampling_kernels.h (one copy per ISA, see vec.h). Tests: tests/test_cpu_sampling.py.
#include <omp.h>

#include <algorithm>
#include <functional>

#include "common.h"
#include "cpu/ops.h"
#include "cpu/scratch.h"
#include "cpu/vec.h"

namespace aigc_rt::cpu {

struct SampleProblem {
  const float* logits;  // (B, V), rows at logits_stride
  int64_t logits_stride, V;
  const bool* seen;     // (B, V) tokens in the prompt or output, rows at seen_stride; null: no penalty
  int64_t seen_stride;
  const float* u;       // (B,) uniform draws in [0, 1)
  bool do_sample;
  float temperature, penalty, top_p;
  int64_t top_k;        // 0: off (also when top_k >= V, as the reference)
};

struct SamplingKernels {
  int64_t (*sample_row)(const SampleProblem&, int64_t row);
};

}  // namespace aigc_rt::cpu

AIGC_BEGIN_AVX512
namespace aigc_rt::cpu::avx512 {
#include "cpu/sampling_kernels.h"
}
AIGC_END_TARGET

AIGC_BEGIN_AVX2
namespace aigc_rt::cpu::avx2 {
#include "cpu/sampling_kernels.h"
}
AIGC_END_TARGET

namespace aigc_rt::cpu::scalar {
#include "cpu/sampling_kernels.h"
}

namespace aigc_rt::cpu {

torch::Tensor sample(const torch::Tensor& logits, bool do_sample, double temperature, int64_t top_k, double top_p,
                     double repetition_penalty, const torch::Tensor& u, const std::optional<torch::Tensor>& seen,
                     const std::optional<torch::Tensor>& out) {
  AIGC_CHECK(logits.device().is_cpu() && logits.scalar_type() == torch::kFloat32 && logits.dim() == 2,
             "sample: logits must be a CPU float32 tensor (B, V), got ", logits.scalar_type(), " ", logits.sizes(),
             " on ", logits.device());
  const int64_t B = logits.size(0), V = logits.size(1);
  AIGC_CHECK(V >= 1 && V < INT32_MAX, "sample: vocabulary size ", V, " is outside [1, 2^31)");
  AIGC_CHECK(logits.stride(1) == 1 || V == 1, "sample: logits must be contiguous in its last dim");
  if (do_sample)
    AIGC_CHECK(std::isfinite(temperature) && temperature > 0, "sample: temperature must be a finite number > 0 "
               "when sampling, got ", temperature);
  AIGC_CHECK(top_k >= 0, "sample: top_k must be >= 0 (0 disables it), got ", top_k);
  AIGC_CHECK(top_p > 0 && top_p <= 1, "sample: top_p must be in (0, 1] (1.0 disables it), got ", top_p);
  AIGC_CHECK(std::isfinite(repetition_penalty) && repetition_penalty > 0,
             "sample: repetition_penalty must be a finite number > 0 (1.0 disables it), got ", repetition_penalty);
  AIGC_CHECK(u.device().is_cpu() && u.scalar_type() == torch::kFloat32 && u.dim() == 1 && u.size(0) == B &&
                 u.is_contiguous(),
             "sample: u must be a contiguous CPU float32 tensor of shape (", B, "), got ", u.scalar_type(), " ",
             u.sizes());
  const float* pu = u.data_ptr<float>();
  if (do_sample)
    for (int64_t b = 0; b < B; ++b)
      AIGC_CHECK(pu[b] >= 0.f && pu[b] < 1.f, "sample: u[", b, "] = ", pu[b], " is outside [0, 1)");
  const bool penalise = seen.has_value() && repetition_penalty != 1.0;
  if (seen)
    AIGC_CHECK(seen->device().is_cpu() && seen->scalar_type() == torch::kBool && seen->sizes() == logits.sizes() &&
                   (seen->stride(1) == 1 || V == 1),
               "sample: seen must be a CPU bool tensor of shape ", logits.sizes(),
               " contiguous in its last dim, got ", seen->scalar_type(), " ", seen->sizes());
  torch::Tensor tokens;
  if (out) {
    AIGC_CHECK(out->device().is_cpu() && out->scalar_type() == torch::kInt64 && out->dim() == 1 &&
                   out->size(0) == B && out->is_contiguous(),
               "sample: out must be a contiguous CPU int64 tensor of shape (", B, "), got ", out->scalar_type(),
               " ", out->sizes());
    tokens = *out;
  } else {
    tokens = torch::empty({B}, torch::kInt64);
  }
  const SampleProblem p{logits.data_ptr<float>(), logits.stride(0), V,
                        penalise ? seen->data_ptr<bool>() : nullptr, penalise ? seen->stride(0) : 0, pu,
                        do_sample, (float)temperature, (float)repetition_penalty, (float)top_p,
                        top_k < V ? top_k : 0};
  const auto sample_row = for_active_isa(scalar::sampling_kernels, avx2::sampling_kernels,
                                         avx512::sampling_kernels).sample_row;
  int64_t* t = tokens.data_ptr<int64_t>();
#pragma omp parallel for schedule(dynamic) if (B > 1)
  for (int64_t b = 0; b < B; ++b) t[b] = sample_row(p, b);
  return tokens;
}

}  // namespace aigc_rt::cpu
