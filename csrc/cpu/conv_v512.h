// The AVX-512 vector type of the convolution micro-kernels (conv_tile.h's V), shared by conv_avx512.cpp and
// conv_avx512bf16.cpp. Include it after the translation unit's `#pragma GCC target`: everything here has internal
// linkage, so each unit gets its own copy compiled for its own target.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace {

struct V512 {
  using T = __m512;
  static constexpr int L = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float f) { return _mm512_set1_ps(f); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T x) { _mm512_storeu_ps(p, x); }
  static void store_n(float* p, T x, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), x); }
  static void store_bf16(uint16_t* p, T x, int n) {  // vec.h's to_bf16 on every lane
    const __m512i b = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(p, (__mmask16)((1u << n) - 1), _mm512_cvtepi32_epi16(r));
  }
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
  // bf16 pairs (conv_tile.h): the emulation, for CPUs without AVX512-BF16 (V512Bf16 overrides dot_pairs)
  static T set1_bits(uint32_t u) { return _mm512_castsi512_ps(_mm512_set1_epi32((int)u)); }
  static T pair_hi(T x) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(-65536)));
  }
  static T pair_lo(T x) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(x), 16)); }
  // acc + a.hi * b.hi + a.lo * b.lo, in vdpbf16ps's order (the products are exact in fp32)
  static T dot_pairs(T acc, T a, T b) { return fmadd(pair_lo(a), pair_lo(b), fmadd(pair_hi(a), pair_hi(b), acc)); }
};

}  // namespace
