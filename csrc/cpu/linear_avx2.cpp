// AVX2 + FMA micro-kernels of the linear layer (see linear.h for the contract, linear.cpp for the op):
//   y[n, o] = sum_k xf[n, k] * w[o, k]   in fp32, 8 lanes, with the weight decoded in registers:
//   fp32 as is; bf16 -> fp32 (<< 16); int8 stored as q + 128 -> float(q). linear.cpp prepares xf so
//   that the math is the AVX-512 kernels' (bf16-rounded activations; int8-quantised activations).
// Compiled with a function-level target attribute; linear.cpp calls it only on CPUs with AVX2 and FMA.
// Tests: tests/test_cpu_linear.py (run with the ISA forced to avx2).
#include <immintrin.h>

#include "cpu/linear.h"

#define AVX2_FMA __attribute__((target("avx2,fma")))

namespace aigc_rt::cpu::linear_detail {
namespace {

// 8 weights of row w starting at k as floats; `valid` lanes only (the rest 0). Reads no byte past them.
struct LoadF32 {
  using T = float;
  AVX2_FMA static __m256 load(const float* w, int64_t valid) {
    if (valid >= 8) return _mm256_loadu_ps(w);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(w, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)valid), lane));
  }
};

struct LoadBf16 {
  using T = uint16_t;
  AVX2_FMA static __m256 load(const uint16_t* w, int64_t valid) {
    __m128i bits;
    if (valid >= 8) {
      bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
    } else {
      alignas(16) uint16_t tmp[8] = {};
      for (int64_t i = 0; i < valid; ++i) tmp[i] = w[i];
      bits = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  }
};

struct LoadInt8 {  // rows are padded to kInt8Block, so 8 bytes can always be read
  using T = uint8_t;
  AVX2_FMA static __m256 load(const uint8_t* w, int64_t) {
    const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w)));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(u, _mm256_set1_epi32(128)));
  }
};

AVX2_FMA inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <class Load>
struct Tiles {
  static constexpr int kR = 4, kM = 2;
  template <int R, int M>
  AVX2_FMA static void tile(const Problem& p, int64_t n, int64_t o) {
    const auto* w = static_cast<const typename Load::T*>(p.w) + o * p.ldw;
    const float* x = p.x.xf + n * p.x.ld;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc[R][M];
#pragma GCC unroll 8
    for (int i = 0; i < R * M; ++i) acc[i / M][i % M] = _mm256_setzero_ps();
    for (int64_t k = 0; k < p.K; k += 8) {
      const int64_t valid = p.K - k;
      __m256 wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) wv[r] = Load::load(w + r * p.ldw + k, valid);
#pragma GCC unroll 2
      for (int m = 0; m < M; ++m) {
        const __m256 xv = valid >= 8 ? _mm256_loadu_ps(x + m * p.x.ld + k)
                                     : _mm256_maskload_ps(x + m * p.x.ld + k,
                                                          _mm256_cmpgt_epi32(_mm256_set1_epi32((int)valid), lane));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
      }
    }
#pragma GCC unroll 2
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) p.y[(n + m) * p.ldy + o + r] = hsum(acc[r][m]);
  }
};

}  // namespace

MicroKernel avx2_kernel(WeightType t) {
  switch (t) {
    case WeightType::f32: return &run_tiles<Tiles<LoadF32>>;
    case WeightType::bf16: return &run_tiles<Tiles<LoadBf16>>;
    case WeightType::int8: return &run_tiles<Tiles<LoadInt8>>;
  }
  return nullptr;
}

}  // namespace aigc_rt::cpu::linear_detail
