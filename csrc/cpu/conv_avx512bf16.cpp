// AVX-512 micro-kernels of the convolutions with native bf16 tiles (vdpbf16ps): V512 with dot_pairs in one
// instruction. conv.cpp takes them for bf16 weights where the CPU has AVX512-BF16 (its fp32 tiles are kAvx512's).
// Kernel: conv_tile.h. Tests: tests/test_cpu_conv.py.
#include <immintrin.h>

#include <cstdint>

#include "cpu/conv_isa.h"

#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx512bf16,fma,avx2")
// GCC 12's own avx512fintrin.h trips -Wmaybe-uninitialized (its _mm512_undefined_ps placeholders)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "cpu/conv_v512.h"

namespace {

struct V512Bf16 : V512 {
  static T dot_pairs(T acc, T a, T b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
};

}  // namespace

#include "cpu/conv_tile.h"

namespace aigc_rt::cpu::conv {
const Isa kAvx512Bf16 = make_isa<V512Bf16, 12, 12, 8, 6>("avx512_bf16");
}
