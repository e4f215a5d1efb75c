// One small SIMD vector type per instruction set, all with the same interface (avx512::Vec, avx2::Vec,
// scalar::Vec), so that a kernel body is written once against `Vec` and compiled once per ISA:
//
//   AIGC_BEGIN_AVX512                                 // #pragma GCC target(...): every function defined
//   namespace aigc_rt::cpu::avx512 {                  // until AIGC_END_TARGET carries the target attribute
//   #include "cpu/foo_kernels.h"                      // the bodies, written against Vec
//   }
//   AIGC_END_TARGET
//
// and the host code picks a namespace's function table with active_isa() at run time. Only the regions get
// AVX-512/AVX2 code, so the .so loads and runs on any x86-64 CPU (scalar fallback below AVX2).
// Tests force each ISA with _C.set_simd_isa(); see tests/test_cpu_attention.py.
#pragma once
#include <immintrin.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

// _Pragma, not #pragma: macros are not expanded inside `#pragma GCC target(...)`. GCC 12 warns wrongly about
// the _mm512_undefined_ps() inside its own intrinsics (GCC bug 105593): silenced in these regions only.
#define AIGC_BEGIN_TARGET(isa)                                                                   \
  _Pragma("GCC push_options") _Pragma(isa) _Pragma("GCC diagnostic push")                         \
      _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")                                     \
          _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define AIGC_BEGIN_AVX512 AIGC_BEGIN_TARGET("GCC target(\"avx512f,avx512dq,avx512vl,fma,bmi,bmi2,popcnt\")")
#define AIGC_BEGIN_AVX2 AIGC_BEGIN_TARGET("GCC target(\"avx2,fma,bmi,bmi2,popcnt\")")
#define AIGC_END_TARGET _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")

namespace aigc_rt::cpu {

enum class Isa { scalar, avx2, avx512 };
const char* isa_name(Isa isa);
Isa detected_isa();            // the best ISA this CPU (and OS) supports
Isa active_isa();              // what the kernels use: detected_isa() unless overridden
void set_active_isa(Isa isa);  // tests: run the fallbacks on an AVX-512 machine (ValueError if unsupported)

// Pick the entry of {scalar, avx2, avx512} for active_isa(): each ISA namespace defines its function table.
template <class T>
const T& for_active_isa(const T& scalar_fns, const T& avx2_fns, const T& avx512_fns) {
  const Isa isa = active_isa();
  return isa == Isa::avx512 ? avx512_fns : isa == Isa::avx2 ? avx2_fns : scalar_fns;
}

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A bfloat16 as stored (torch.bfloat16's bits): the top half of an fp32. Vec::load widens it exactly.
struct Bf16 {
  uint16_t bits;
};

// fp32 -> bf16 bits, rounding to nearest even as torch's .to(torch.bfloat16); NaN stays a (quiet) NaN.
// (A select, not a branch, so that loops over it vectorise.)
inline uint16_t to_bf16(float f) {
  const uint32_t b = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((b & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

// The first n (< W) values of p followed by zeros, for a tail load that must not read past p[n - 1].
template <int W>
inline std::array<Bf16, W> padded(const Bf16* p, int n) {
  std::array<Bf16, W> t{};
  for (int i = 0; i < n; ++i) t[i] = p[i];
  return t;
}

// Calls f(std::integral_constant<int, n>{}) for a run-time n in [1, N]: picks a template instantiation.
template <int N, class F>
inline void with_count(int n, F&& f) {
  if constexpr (N > 1) {
    if (n < N) return with_count<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>{});
}

// exp(x) for float vectors, Cephes expf: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-7 polynomial
// (about 1 ulp), scaled by 2^n. x > 88 is clamped to 88 (our callers only take exp of values <= 0),
// x < -87.3 gives 0, NaN gives NaN.
namespace expf_poly {
constexpr float kMaxX = 88.0f, kMinX = -87.33654475f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float c0 = 1.9875691500e-4f, c1 = 1.3981999507e-3f, c2 = 8.3334519073e-3f, c3 = 4.1665795894e-2f,
                c4 = 1.6666665459e-1f, c5 = 5.0000001201e-1f;
}  // namespace expf_poly

}  // namespace aigc_rt::cpu

// -------------------------------------------------------------------------------------------------------
AIGC_BEGIN_AVX512
namespace aigc_rt::cpu::avx512 {
struct Vec {
  static constexpr int W = 16;  // lanes
  static constexpr int MR = 6;  // register tile of the attention GEMMs: MR rows x NK vectors (24 zmm)
  static constexpr int NK = 4;
  using Mask = __mmask16;
  __m512 v;

  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec all(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const float* p, int n) { return {_mm512_maskz_loadu_ps(first(n), p)}; }  // lanes >= n: 0, unread
  static Vec load(const Bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  static Vec load(const Bf16* p, int n) { return n == W ? load(p) : load(padded<W>(p, n).data()); }  // lanes >= n: 0, unread
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void store(float* p, int n) const { _mm512_mask_storeu_ps(p, first(n), v); }
  // lane i = p[i * stride] (for lanes < n), 0 beyond; (W - 1) * stride must fit an int32
  static Vec gather(const float* p, int32_t stride, int n = W) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set1_epi32(stride),
                                           _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    return {_mm512_mask_i32gather_ps(_mm512_setzero_ps(), first(n), idx, p, 4)};
  }

  Vec operator+(Vec b) const { return {_mm512_add_ps(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm512_sub_ps(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm512_mul_ps(v, b.v)}; }
  Vec operator/(Vec b) const { return {_mm512_div_ps(v, b.v)}; }  // IEEE, as torch's division
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }  // a * b + c
  static Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  float sum() const {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  float hmax() const {
    __m256 h = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  static Vec exp(Vec x) {
    using namespace expf_poly;
    const __mmask16 underflow = _mm512_cmp_ps_mask(x.v, _mm512_set1_ps(kMinX), _CMP_LT_OQ);
    const __m512 xc = _mm512_min_ps(_mm512_set1_ps(kMaxX), x.v);  // NaN stays NaN (min returns operand 2)
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(c0), r, _mm512_set1_ps(c1));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c4));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c5));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return {_mm512_maskz_mov_ps(~underflow, _mm512_scalef_ps(y, n))};
  }

  static Mask first(int n) { return (Mask)((1u << n) - 1); }  // lanes < n, n in [0, W]
  static Mask gt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
  static Mask ge(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ); }
  static Mask lt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
  static Mask eq(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
  static Mask nonzero(const bool* p) {  // W bools
    const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_test_epi32_mask(x, x);
  }
  static Vec select(Mask m, Vec a, Vec b) { return {_mm512_mask_blend_ps(m, b.v, a.v)}; }  // m ? a : b
  static bool any(Mask m) { return m != 0; }
  static uint32_t bits(Mask m) { return m; }
  // The selected lanes of a (or their indices base + lane), in order, at dst; returns how many. Writes W
  // elements (callers leave W of slack): a register compress + plain store, as vcompressps to memory is
  // microcoded on some CPUs.
  static int compress(float* dst, Mask m, Vec a) {
    _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(m, a.v));
    return _mm_popcnt_u32(m);
  }
  static int compress_index(int32_t* dst, Mask m, int32_t base) {
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(base),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    _mm512_storeu_si512(dst, _mm512_maskz_compress_epi32(m, idx));
    return _mm_popcnt_u32(m);
  }
};
}  // namespace aigc_rt::cpu::avx512
AIGC_END_TARGET

// -------------------------------------------------------------------------------------------------------
AIGC_BEGIN_AVX2
namespace aigc_rt::cpu::avx2 {
struct Vec {
  static constexpr int W = 8;
  static constexpr int MR = 6;  // 6 x 2 accumulators + 2 loads + 1 broadcast of 16 ymm
  static constexpr int NK = 2;
  using Mask = __m256;  // all-ones lanes
  __m256 v;

  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec all(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const float* p, int n) { return {_mm256_maskload_ps(p, _mm256_castps_si256(first(n)))}; }
  static Vec load(const Bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  static Vec load(const Bf16* p, int n) { return n == W ? load(p) : load(padded<W>(p, n).data()); }  // lanes >= n: 0, unread
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(float* p, int n) const { _mm256_maskstore_ps(p, _mm256_castps_si256(first(n)), v); }
  static Vec gather(const float* p, int32_t stride, int n = W) {
    const __m256i idx = _mm256_mullo_epi32(_mm256_set1_epi32(stride), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return {_mm256_mask_i32gather_ps(_mm256_setzero_ps(), p, idx, first(n), 4)};
  }

  Vec operator+(Vec b) const { return {_mm256_add_ps(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm256_sub_ps(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm256_mul_ps(v, b.v)}; }
  Vec operator/(Vec b) const { return {_mm256_div_ps(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  float sum() const {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  float hmax() const {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  static Vec exp(Vec x) {
    using namespace expf_poly;
    const __m256 underflow = _mm256_cmp_ps(x.v, _mm256_set1_ps(kMinX), _CMP_LT_OQ);
    const __m256 xc = _mm256_min_ps(_mm256_set1_ps(kMaxX), x.v);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(c0), r, _mm256_set1_ps(c1));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c4));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c5));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    // 2^n: n in [-126, 127] here, so the biased exponent n + 127 fits its 8 bits
    const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return {_mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)))};
  }

  static Mask first(int n) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  static Mask gt(Vec a, Vec b) { return _mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ); }
  static Mask ge(Vec a, Vec b) { return _mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ); }
  static Mask lt(Vec a, Vec b) { return _mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ); }
  static Mask eq(Vec a, Vec b) { return _mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ); }
  static Mask nonzero(const bool* p) {
    const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(x, _mm256_setzero_si256()));
  }
  static Vec select(Mask m, Vec a, Vec b) { return {_mm256_blendv_ps(b.v, a.v, m)}; }
  static bool any(Mask m) { return !_mm256_testz_ps(m, m); }
  static uint32_t bits(Mask m) { return (uint32_t)_mm256_movemask_ps(m); }
  // compress: the permutation that packs the selected lanes, from their bits (pdep/pext, no table)
  static __m256i packing(uint32_t b) {
    const uint64_t lanes = _pdep_u64(b, 0x0101010101010101ull) * 0xFF;
    return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((int64_t)_pext_u64(0x0706050403020100ull, lanes)));
  }
  static int compress(float* dst, Mask m, Vec a) {
    const uint32_t b = bits(m);
    _mm256_storeu_ps(dst, _mm256_permutevar8x32_ps(a.v, packing(b)));
    return _mm_popcnt_u32(b);
  }
  static int compress_index(int32_t* dst, Mask m, int32_t base) {
    const uint32_t b = bits(m);
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permutevar8x32_epi32(idx, packing(b)));
    return _mm_popcnt_u32(b);
  }
};
}  // namespace aigc_rt::cpu::avx2
AIGC_END_TARGET

// -------------------------------------------------------------------------------------------------------
namespace aigc_rt::cpu::scalar {
struct Vec {
  static constexpr int W = 1;
  static constexpr int MR = 4;
  static constexpr int NK = 4;
  using Mask = bool;
  float v;

  static Vec zero() { return {0.f}; }
  static Vec all(float x) { return {x}; }
  static Vec load(const float* p) { return {*p}; }
  static Vec load(const float* p, int n) { return {n > 0 ? *p : 0.f}; }
  static Vec load(const Bf16* p) { return {std::bit_cast<float>(uint32_t(p->bits) << 16)}; }
  static Vec load(const Bf16* p, int n) { return {n > 0 ? load(p).v : 0.f}; }
  void store(float* p) const { *p = v; }
  void store(float* p, int n) const {
    if (n > 0) *p = v;
  }
  static Vec gather(const float* p, int32_t, int n = W) { return {n > 0 ? *p : 0.f}; }

  Vec operator+(Vec b) const { return {v + b.v}; }
  Vec operator-(Vec b) const { return {v - b.v}; }
  Vec operator*(Vec b) const { return {v * b.v}; }
  Vec operator/(Vec b) const { return {v / b.v}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {a.v * b.v + c.v}; }
  static Vec max(Vec a, Vec b) { return {a.v > b.v ? a.v : b.v}; }
  float sum() const { return v; }
  float hmax() const { return v; }
  static Vec exp(Vec x) {  // NaN fails both tests and stays NaN
    return {x.v < expf_poly::kMinX ? 0.f : std::exp(x.v > expf_poly::kMaxX ? expf_poly::kMaxX : x.v)};
  }

  static Mask first(int n) { return n > 0; }
  static Mask gt(Vec a, Vec b) { return a.v > b.v; }
  static Mask ge(Vec a, Vec b) { return a.v >= b.v; }
  static Mask lt(Vec a, Vec b) { return a.v < b.v; }
  static Mask eq(Vec a, Vec b) { return a.v == b.v; }
  static Mask nonzero(const bool* p) { return *p; }
  static Vec select(Mask m, Vec a, Vec b) { return m ? a : b; }
  static bool any(Mask m) { return m; }
  static uint32_t bits(Mask m) { return m; }
  static int compress(float* dst, Mask m, Vec a) {
    *dst = a.v;
    return m;
  }
  static int compress_index(int32_t* dst, Mask m, int32_t base) {
    *dst = base;
    return m;
  }
};
}  // namespace aigc_rt::cpu::scalar
