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
// whether two tensors' memory ranges intersect (an `out=` buffer must not alias an input)
inline bool overlap(const torch::Tensor& a, const torch::Tensor& b) {
  const auto *pa = static_cast<const char*>(a.data_ptr()), *pb = static_cast<const char*>(b.data_ptr());
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}
}  // namespace aigc_rt
