// Embedding lookup with the table in the weights file's dtype, dequantised to fp32 rows, plus (optionally) a
// position embedding:
//
//   out[n, :] = table[ids[n], :] * (scale[ids[n]] for int8 tables, else 1) + (pos_table[positions[n], :])
//
// table (V, C): fp32, bf16, fp16, or int8 with one fp32 scale per row (wte is also the int8 lm_head, whose
// scales are per vocabulary row); pos_table (P, C) fp32. Writes into `out` when given (the allocation-free
// decode step). Reference: the torch backend's embedding. Tests: tests/test_cpu_linear.py.
#include <bit>

#include "common.h"
#include "cpu/ops.h"

namespace aigc_rt::cpu {

torch::Tensor embedding(const torch::Tensor& table, const torch::Tensor& ids, const c10::optional<torch::Tensor>& scale,
                        const c10::optional<torch::Tensor>& out, const c10::optional<torch::Tensor>& pos_table,
                        const c10::optional<torch::Tensor>& positions) {
  AIGC_CHECK(table.device().is_cpu() && table.is_contiguous() && table.dim() == 2,
             "embedding: table must be a contiguous 2-D CPU tensor, got shape ", table.sizes());
  const auto dt = table.scalar_type();
  AIGC_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kHalf || dt == torch::kInt8,
             "embedding: table dtype ", dt, " is not supported (float32, bfloat16, float16, int8)");
  AIGC_CHECK_CPU_CONTIGUOUS(ids, torch::kInt64);
  AIGC_CHECK((dt == torch::kInt8) == scale.has_value(),
             "embedding: a scale is required for an int8 table and only for it");
  const int64_t V = table.size(0), C = table.size(1), N = ids.numel();
  if (scale) {
    AIGC_CHECK_CPU_CONTIGUOUS(*scale, torch::kFloat32);
    AIGC_CHECK(scale->dim() == 1 && scale->size(0) == V, "embedding: scale has shape ", scale->sizes(),
               ", expected [", V, "]");
  }
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    AIGC_CHECK(id[n] >= 0 && id[n] < V, "embedding: id ", id[n], " is outside [0, ", V, ")");
  AIGC_CHECK(pos_table.has_value() == positions.has_value(),
             "embedding: pos_table and positions go together (one was given without the other)");
  const float* pos_rows = nullptr;
  const int64_t* pos = nullptr;
  if (pos_table) {
    AIGC_CHECK_CPU_CONTIGUOUS(*pos_table, torch::kFloat32);
    AIGC_CHECK_CPU_CONTIGUOUS(*positions, torch::kInt64);
    AIGC_CHECK(pos_table->dim() == 2 && pos_table->size(1) == C, "embedding: pos_table has shape ",
               pos_table->sizes(), ", expected [P, ", C, "]");
    AIGC_CHECK(positions->sizes() == ids.sizes(), "embedding: positions has shape ", positions->sizes(),
               ", expected the ids' ", ids.sizes());
    pos_rows = pos_table->data_ptr<float>();
    pos = positions->data_ptr<int64_t>();
    const int64_t P = pos_table->size(0);
    for (int64_t n = 0; n < N; ++n)
      AIGC_CHECK(pos[n] >= 0 && pos[n] < P, "embedding: position ", pos[n], " is outside [0, ", P, ")");
  }
  auto out_sizes = ids.sizes().vec();
  out_sizes.push_back(C);
  torch::Tensor y;
  if (out) {
    AIGC_CHECK_CPU_CONTIGUOUS(*out, torch::kFloat32);
    AIGC_CHECK(out->sizes() == c10::IntArrayRef(out_sizes), "embedding: out has shape ", out->sizes(),
               ", expected ", c10::IntArrayRef(out_sizes));
    y = *out;
  } else {
    y = torch::empty(out_sizes, torch::kFloat32);
  }
  float* dst = y.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    float* row = dst + n * C;
    if (dt == torch::kFloat32) {
      const float* src = table.data_ptr<float>() + id[n] * C;
      for (int64_t c = 0; c < C; ++c) row[c] = src[c];
    } else if (dt == torch::kBFloat16) {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(table.data_ptr()) + id[n] * C;
      for (int64_t c = 0; c < C; ++c) row[c] = std::bit_cast<float>(static_cast<uint32_t>(src[c]) << 16);
    } else if (dt == torch::kHalf) {
      const c10::Half* src = table.data_ptr<c10::Half>() + id[n] * C;
      for (int64_t c = 0; c < C; ++c) row[c] = static_cast<float>(src[c]);
    } else {
      const int8_t* src = table.data_ptr<int8_t>() + id[n] * C;
      const float s = scale->data_ptr<float>()[id[n]];
      for (int64_t c = 0; c < C; ++c) row[c] = src[c] * s;
    }
    if (pos_rows) {
      const float* p = pos_rows + pos[n] * C;
      for (int64_t c = 0; c < C; ++c) row[c] += p[c];
    }
  }
  return y;
}

}  // namespace aigc_rt::cpu
