// AVX2 + FMA micro-kernels of the linear layer (see linear.h for the packed layout and the contract):
//   acc[8 outputs] += w[panel, k, half] * broadcast(xf[k])   in fp32, each panel as two halves of 8 rows,
// with the weight decoded in registers: fp32 as is; bf16 pairs split into the even and odd k (<< 16 and
// & 0xffff0000); int8 quads split into their 4 bytes u = q + 128 (the epilogue removes the 128, see linear.h).
// linear.cpp prepares xf so that the math is the AVX-512 kernels' (bf16-rounded, or int8-quantised and
// dequantised, activations), zero-padded to the packed K.
// Compiled with a function-level target attribute; linear.cpp calls it only on CPUs with AVX2 and FMA.
// Tests: tests/test_cpu_linear.py (run with the ISA forced to avx2).
#include <immintrin.h>

#include "cpu/linear.h"

#define AVX2_FMA __attribute__((target("avx2,fma")))

namespace aigc_rt::cpu::linear_detail {
namespace {

template <int R, int M>
AVX2_FMA inline void store_tile(const Problem& p, int64_t n, int64_t panel, __m256 (&acc)[R][2][M]) {
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      const int64_t o = (panel + r) * kPanel + 8 * h;
      for (int m = 0; m < M; ++m) {
        float* dst = p.y + (n + m) * p.ldy + o;
        if (p.O - o >= 8) {
          _mm256_storeu_ps(dst, acc[r][h][m]);
        } else if (p.O > o) {
          alignas(32) float tmp[8];
          _mm256_store_ps(tmp, acc[r][h][m]);
          for (int64_t i = 0; i < p.O - o; ++i) dst[i] = tmp[i];
        }
      }
    }
}

// G = k values per group; Decode::weights(w, out) turns one group of a panel half (8 rows x G) into G
// vectors of 8 floats, out[j] = the rows' weights at k = group * G + j.
struct F32 {
  static constexpr int G = 1;
  using T = float;
  AVX2_FMA static void weights(const float* w, __m256 (&out)[1]) { out[0] = _mm256_loadu_ps(w); }
};

struct Bf16 {
  static constexpr int G = 2;
  using T = uint16_t;
  AVX2_FMA static void weights(const uint16_t* w, __m256 (&out)[2]) {
    const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    out[0] = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
    out[1] = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(int(0xffff0000u))));
  }
};

struct Int8 {
  static constexpr int G = 4;
  using T = uint8_t;
  AVX2_FMA static void weights(const uint8_t* w, __m256 (&out)[4]) {
    const __m256i quads = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i byte = _mm256_set1_epi32(0xff);
    out[0] = _mm256_cvtepi32_ps(_mm256_and_si256(quads, byte));
    out[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(quads, 8), byte));
    out[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(quads, 16), byte));
    out[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(quads, 24));
  }
};

template <class D>
struct Tiles {
  static constexpr int kR = 1, kM = 3;
  static constexpr int64_t panels(int64_t) { return 1; }
  template <int R, int M>
  AVX2_FMA static void tile(const Problem& p, int64_t n, int64_t panel) {
    constexpr int G = D::G;
    const int64_t stride = p.groups * kPanel * G;  // elements per panel
    const auto* w = static_cast<const typename D::T*>(p.w) + panel * stride;
    const float* x = p.x.xf + n * p.x.ld;
    const int64_t groups = (p.K + G - 1) / G;  // packed groups past K hold zeros: skip them
    __m256 acc[R][2][M];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h)
        for (int m = 0; m < M; ++m) acc[r][h][m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h) {
          __m256 wv[G];
          D::weights(w + r * stride + (g * kPanel + 8 * h) * G, wv);
          for (int m = 0; m < M; ++m)
            for (int j = 0; j < G; ++j)
              acc[r][h][m] = _mm256_fmadd_ps(wv[j], _mm256_set1_ps(x[m * p.x.ld + g * G + j]), acc[r][h][m]);
        }
    }
    store_tile<R, M>(p, n, panel, acc);
  }
};

}  // namespace

MicroKernel avx2_kernel(WeightType t) {
  switch (t) {
    case WeightType::f32: return &run_tiles<Tiles<F32>>;
    case WeightType::bf16: return &run_tiles<Tiles<Bf16>>;
    case WeightType::int8: return &run_tiles<Tiles<Int8>>;
  }
  return nullptr;
}

}  // namespace aigc_rt::cpu::linear_detail
