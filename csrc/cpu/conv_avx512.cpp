// AVX-512 micro-kernels of the convolutions, conv2d and conv_transpose: 16 floats per register, 32 registers,
// so tiles of 12 rows x 1-2 vectors, 8 x 3 and 6 x 4 (accumulators + the weight vectors + one broadcast <= 32).
// Compiled for AVX-512 by the pragma below whatever the build flags; conv.cpp calls it only where the CPU has
// AVX-512. Kernel: conv_tile.h. Tests: tests/test_cpu_conv.py.
#include <immintrin.h>

#include <cstdint>

#include "cpu/conv_isa.h"

#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,fma,avx2")
// GCC 12's own avx512fintrin.h trips -Wmaybe-uninitialized (its _mm512_undefined_ps placeholders)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

struct V512 {
  using T = __m512;
  static constexpr int L = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float f) { return _mm512_set1_ps(f); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static void store_n(float* p, T x, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), x); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T div(T a, T b) { return _mm512_div_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T abs(T x) { return _mm512_abs_ps(x); }
  static T copysign(T mag, T sign) {
    const T s = _mm512_set1_ps(-0.f);
    return _mm512_or_ps(_mm512_and_ps(sign, s), _mm512_andnot_ps(s, mag));
  }
  static T select_negative(T x, T a, T b) {  // by x's sign bit
    return _mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512(x)), b, a);
  }
  // e^x = 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 (two-part ln 2); e^r by Cephes' expf polynomial.
  static T exp_nonpositive(T x) {
    const T keep = x;  // 0 below -87 (e^-87 ~ 1.6e-38, just above FLT_MIN): no denormals
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const T n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    T r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    T q = _mm512_set1_ps(1.9875691500e-4f);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.3981999507e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.3334519073e-3f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1665795894e-2f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.6666665459e-1f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.0000001201e-1f));
    q = _mm512_fmadd_ps(_mm512_mul_ps(q, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(keep, _mm512_set1_ps(-87.f), _CMP_GE_OQ),
                               _mm512_scalef_ps(q, n));
  }
};

}  // namespace

#include "cpu/conv_tile.h"

namespace aigc_rt::cpu::conv {
const Isa kAvx512 = make_isa<V512, 12, 12, 8, 6>("avx512");
}
