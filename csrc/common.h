// Shared helpers for the C++ kernels: host-side argument checks that raise a Python ValueError
// naming the problem (never a crash inside a kernel).
#pragma once
#include <torch/extension.h>

#define AIGC_CHECK(cond, ...)                                                   \
  do {                                                                          \
    if (!(cond)) throw pybind11::value_error(c10::str(__VA_ARGS__));            \
  } while (0)

#define AIGC_CHECK_CPU_CONTIGUOUS(t, dtype_)                                              \
  do {                                                                                    \
    AIGC_CHECK((t).device().is_cpu(), #t " must be a CPU tensor, got ", (t).device());    \
    AIGC_CHECK((t).is_contiguous(), #t " must be contiguous");                            \
    AIGC_CHECK((t).scalar_type() == (dtype_), #t " must be ", (dtype_), ", got ",         \
               (t).scalar_type());                                                        \
  } while (0)

namespace aigc_rt {
// A KV cache (one layer's keys or values): (B, H, S, D) fp32 or bf16 on the CPU, contiguous in its last dim.
// attention_decode reads it, write_kv writes it.
inline void check_kv_cache(const torch::Tensor& t, const std::string& name) {
  AIGC_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  AIGC_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16, name,
             " must be float32 or bfloat16, got ", t.scalar_type());
  AIGC_CHECK(t.dim() == 4, name, " must have 4 dims, got shape ", t.sizes());
  AIGC_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must be contiguous in its last dim, got strides ",
             t.strides());
}

// whether two tensors' memory ranges intersect (an `out=` buffer must not alias an input)
inline bool overlap(const torch::Tensor& a, const torch::Tensor& b) {
  const auto *pa = static_cast<const char*>(a.data_ptr()), *pb = static_cast<const char*>(b.data_ptr());
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}
}  // namespace aigc_rt
