// Run-time choice of the instruction set the kernels use (see vec.h).
#include "cpu/vec.h"

#include <atomic>

#include "common.h"
#include "cpu/ops.h"

namespace aigc_rt::cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

Isa detected_isa() {
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2"))
      return Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
      return Isa::avx2;
    return Isa::scalar;
  }();
  return best;
}

static std::atomic<int> g_override{-1};  // -1: use detected_isa()

Isa active_isa() {
  const int o = g_override.load(std::memory_order_relaxed);
  return o < 0 ? detected_isa() : static_cast<Isa>(o);
}

void set_active_isa(Isa isa) {
  AIGC_CHECK(isa <= detected_isa(), "this CPU does not support ", isa_name(isa), " (best: ",
             isa_name(detected_isa()), ")");
  g_override.store(static_cast<int>(isa), std::memory_order_relaxed);
}

std::string simd_isa() { return isa_name(active_isa()); }

std::string set_simd_isa(const std::string& name) {
  const std::string previous = simd_isa();
  for (Isa isa : {Isa::scalar, Isa::avx2, Isa::avx512})
    if (name == isa_name(isa)) {
      set_active_isa(isa);
      return previous;
    }
  AIGC_CHECK(false, "unknown ISA '", name, "'; choose one of scalar, avx2, avx512");
  return previous;
}

}  // namespace aigc_rt::cpu
