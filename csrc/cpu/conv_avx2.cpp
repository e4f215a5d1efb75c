// AVX2 + FMA micro-kernels of the convolutions, conv2d and conv_transpose (the fallback where AVX-512 is
// missing): 8 floats per register, 16 registers, so tiles of 8 rows x 1 vector, 6 x 2, 4 x 3 and 2 x 4.
// Compiled for AVX2 by the pragma below whatever the build flags. Kernel: conv_tile.h.
// Tests: tests/test_cpu_conv.py (isa="avx2").
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "cpu/conv_isa.h"

#pragma GCC target("avx2,fma")

namespace {

struct V256 {
  using T = __m256;
  static constexpr int L = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float f) { return _mm256_set1_ps(f); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T x) { _mm256_storeu_ps(p, x); }
  static void store_n(float* p, T x, int n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane), x);
  }
  static void store_bf16(uint16_t* p, T x, int n) {  // vec.h's to_bf16 on every lane
    const __m256i b = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    // packus: [r0..r3, r0..r3 | r4..r7, r4..r7] as u16 (each r <= 0xffff: exact); qwords 0 and 2 = r0..r7
    const __m128i h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
    if (n == L) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    } else {
      alignas(16) uint16_t t[L];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), h);
      std::memcpy(p, t, n * sizeof(uint16_t));
    }
  }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T div(T a, T b) { return _mm256_div_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T abs(T x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), x); }
  static T copysign(T mag, T sign) {
    const T s = _mm256_set1_ps(-0.f);
    return _mm256_or_ps(_mm256_and_ps(sign, s), _mm256_andnot_ps(s, mag));
  }
  static T select_negative(T x, T a, T b) { return _mm256_blendv_ps(b, a, x); }  // by x's sign bit
  // bf16 pairs (conv_tile.h), emulated: AVX2 has no bf16 dot product
  static T set1_bits(uint32_t u) { return _mm256_castsi256_ps(_mm256_set1_epi32((int)u)); }
  static T pair_hi(T x) {
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(-65536)));
  }
  static T pair_lo(T x) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(x), 16)); }
  static T dot_pairs(T acc, T a, T b) { return fmadd(pair_lo(a), pair_lo(b), fmadd(pair_hi(a), pair_hi(b), acc)); }
  // As V512::exp_nonpositive; 2^n built in the exponent bits (n >= -126 after the clamp).
  static T exp_nonpositive(T x) {
    const T keep = x;  // 0 below -87 (e^-87 ~ 1.6e-38, just above FLT_MIN): no denormals
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const T n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    T r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    T q = _mm256_set1_ps(1.9875691500e-4f);
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.3981999507e-3f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.3334519073e-3f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.1665795894e-2f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.6666665459e-1f));
    q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(5.0000001201e-1f));
    q = _mm256_fmadd_ps(_mm256_mul_ps(q, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(q, _mm256_castsi256_ps(e)),
                         _mm256_cmp_ps(keep, _mm256_set1_ps(-87.f), _CMP_GE_OQ));
  }
};

}  // namespace

#include "cpu/conv_tile.h"

namespace aigc_rt::cpu::conv {
const Isa kAvx2 = make_isa<V256, 8, 6, 4, 2>("avx2");
}
