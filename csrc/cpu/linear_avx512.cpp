// AVX-512 micro-kernels of the linear layer (see linear.h for the contract, linear.cpp for the op):
//   fp32 weights: y[n, o] = sum_k x[n, k] * w[o, k]                          (vfmadd231ps)
//   bf16 weights: y[n, o] = sum_k bf16(x[n, k]) * w[o, k], fp32 accumulation  (vdpbf16ps, avx512_bf16)
//   int8 weights: y[n, o] = sum_b sx[n, b] * sum_{k in b} (q[o, k] + 128) * xq[n, k]   (vpdpbusd, VNNI)
// Each function carries its own target attribute, so the library loads on any x86-64 CPU; linear.cpp
// calls these only after __builtin_cpu_supports says the CPU has the features.
// Tests: tests/test_cpu_linear.py (every ISA the machine has, against plain-PyTorch fp32 math).
// gcc 12 warns about the deliberately undefined pass-through operand inside its own intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "cpu/linear.h"

#define AIGC_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,fma"
#define AVX512_F32 __attribute__((target(AIGC_AVX512)))
#define AVX512_BF16 __attribute__((target(AIGC_AVX512 ",avx512bf16")))
#define AVX512_VNNI __attribute__((target(AIGC_AVX512 ",avx512vnni")))

namespace aigc_rt::cpu::linear_detail {
namespace {

// bytes ahead of the current position that each weight row is prefetched into L1
constexpr int64_t kPrefetchBytes = 1024;

template <int R, int M>
__attribute__((target(AIGC_AVX512))) inline void store_sums(const Problem& p, int64_t n, int64_t o,
                                                            __m512 (&acc)[R][M]) {
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) p.y[(n + m) * p.ldy + o + r] = _mm512_reduce_add_ps(acc[r][m]);
}

struct F32Tiles {
  static constexpr int kR = 4, kM = 4;
  template <int R, int M>
  AVX512_F32 static void tile(const Problem& p, int64_t n, int64_t o) {
    const float* w = static_cast<const float*>(p.w) + o * p.ldw;
    const float* x = p.x.xf + n * p.x.ld;
    __m512 acc[R][M];
#pragma GCC unroll 16
    for (int i = 0; i < R * M; ++i) acc[i / M][i % M] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= p.K; k += 16) {
      __m512 wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + r * p.ldw + k) + kPrefetchBytes, _MM_HINT_T0);
        wv[r] = _mm512_loadu_ps(w + r * p.ldw + k);
      }
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * p.x.ld + k);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
      }
    }
    if (k < p.K) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (p.K - k)) - 1);
      __m512 wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(tail, w + r * p.ldw + k);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * p.x.ld + k);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
      }
    }
    store_sums<R, M>(p, n, o, acc);
  }
};

struct Bf16Tiles {
  static constexpr int kR = 4, kM = 4;
  template <int R, int M>
  AVX512_BF16 static void tile(const Problem& p, int64_t n, int64_t o) {
    const uint16_t* w = static_cast<const uint16_t*>(p.w) + o * p.ldw;
    const uint16_t* x = p.x.xh + n * p.x.ld;  // rows zero-padded to kBf16Pad
    __m512 acc[R][M];
#pragma GCC unroll 16
    for (int i = 0; i < R * M; ++i) acc[i / M][i % M] = _mm512_setzero_ps();
    for (int64_t k = 0; k < p.K; k += 32) {
      const __mmask32 valid = p.K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (p.K - k)) - 1);
      __m512bh wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + r * p.ldw + k) + kPrefetchBytes, _MM_HINT_T0);
        wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(valid, w + r * p.ldw + k);
      }
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * p.x.ld + k);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
      }
    }
    store_sums<R, M>(p, n, o, acc);
  }
};

struct Int8Tiles {
  static constexpr int kR = 4, kM = 4;
  template <int R, int M>
  AVX512_VNNI static void tile(const Problem& p, int64_t n, int64_t o) {
    const uint8_t* w = static_cast<const uint8_t*>(p.w) + o * p.ldw;  // rows padded to kInt8Block
    const int8_t* x = p.x.xq + n * p.x.ld;
    const int64_t blocks = p.ldw / kInt8Block;
    const float* sx = p.x.sx + n * blocks;
    __m512 acc[R][M];
#pragma GCC unroll 16
    for (int i = 0; i < R * M; ++i) acc[i / M][i % M] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k = b * kInt8Block;
      __m512i wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + r * p.ldw + k) + kPrefetchBytes, _MM_HINT_T0);
        wv[r] = _mm512_loadu_si512(w + r * p.ldw + k);
      }
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const __m512i xv = _mm512_loadu_si512(x + m * p.x.ld + k);
        const __m512 scale = _mm512_set1_ps(sx[m * blocks + b]);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[r], xv);  // exact in int32
          acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r][m]);
        }
      }
    }
    store_sums<R, M>(p, n, o, acc);
  }
};

}  // namespace

MicroKernel avx512_kernel(WeightType t) {
  switch (t) {
    case WeightType::f32: return &run_tiles<F32Tiles>;
    case WeightType::bf16: return &run_tiles<Bf16Tiles>;
    case WeightType::int8: return &run_tiles<Int8Tiles>;
  }
  return nullptr;
}

}  // namespace aigc_rt::cpu::linear_detail
