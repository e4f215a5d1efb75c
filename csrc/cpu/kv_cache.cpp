// Appending a decode step's keys and values to the KV cache, converting to the cache's dtype on the way:
//   k_cache[b, h, positions[b], :] = k[b, h, :]   (and the same for v), fp32 -> fp32 or bf16 (round to nearest
//   even, as torch's .to(torch.bfloat16)).
// B*H*D values per call: a plain loop (torch's scatter_ into a bf16 tensor took ~1.6 ms here for 8 x 12 x 64).
// Tests: tests/test_cpu_attention.py (test_write_kv*).
#include "common.h"
#include "cpu/ops.h"

namespace aigc_rt::cpu {

template <class T>
static void write_rows(torch::Tensor& cache, const int64_t* pos, const torch::Tensor& x) {
  const int64_t B = x.size(0), H = x.size(1), D = x.size(2);
  T* c = cache.data_ptr<T>();
  const float* src = x.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      T* dst = c + b * cache.stride(0) + h * cache.stride(1) + pos[b] * cache.stride(2);
      const float* row = src + b * x.stride(0) + h * x.stride(1);
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(row[d]);
    }
}

void write_kv(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& positions, const torch::Tensor& k,
              const torch::Tensor& v) {
  check_kv_cache(k_cache, "write_kv: k_cache");
  check_kv_cache(v_cache, "write_kv: v_cache");
  AIGC_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
             "write_kv: k_cache ", k_cache.sizes(), " ", k_cache.scalar_type(), " and v_cache ", v_cache.sizes(),
             " ", v_cache.scalar_type(), " differ");
  const int64_t B = k_cache.size(0), H = k_cache.size(1), S = k_cache.size(2), D = k_cache.size(3);
  for (const torch::Tensor* x : {&k, &v}) {
    AIGC_CHECK(x->device().is_cpu() && x->scalar_type() == torch::kFloat32, "write_kv: k, v must be float32 CPU tensors");
    AIGC_CHECK(x->dim() == 3 && x->size(0) == B && x->size(1) == H && x->size(2) == D, "write_kv: k, v must be (",
               B, ", ", H, ", ", D, ") to match the caches, got ", x->sizes());
    AIGC_CHECK(D <= 1 || x->stride(2) == 1, "write_kv: k, v must be contiguous in their last dim");
  }
  AIGC_CHECK(positions.device().is_cpu() && positions.scalar_type() == torch::kInt64 && positions.dim() == 1 &&
                 positions.size(0) == B && positions.is_contiguous(),
             "write_kv: positions must be a contiguous CPU int64 tensor of shape (", B, ")");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    AIGC_CHECK(pos[b] >= 0 && pos[b] < S, "write_kv: positions[", b, "] = ", pos[b], " is outside [0, ", S, ")");
  if (k_cache.scalar_type() == torch::kBFloat16) {
    write_rows<c10::BFloat16>(k_cache, pos, k);
    write_rows<c10::BFloat16>(v_cache, pos, v);
  } else {
    write_rows<float>(k_cache, pos, k);
    write_rows<float>(v_cache, pos, v);
  }
}

}  // namespace aigc_rt::cpu
