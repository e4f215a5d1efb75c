// AVX2 + FMA micro-kernels of the linear layer (see linear.h for the packed layout and the contract), each
// panel as two halves of 8 rows:
//   fp32, fp16, bf16: acc[8 outputs] += w[panel, k, half] * broadcast(xf[k]) in fp32, with the weight decoded in
//     registers (fp16 by vcvtph2ps; bf16 pairs split into the even and odd k: << 16 and & 0xffff0000); linear.cpp
//     prepares xf so that the math is the AVX-512 kernels' (fp16- or bf16-rounded activations), zero-padded to the
//     packed K.
//   int8: per block of 64 inputs, i = sum over quads of q[panel, k/4, half, 0:4] . xq[k:k+4], exact in int32,
//     then acc += float(i) * sx[b], as the VNNI kernel. Without VNNI the quad products come from vpmaddubsw
//     (u8 x s8 -> pairs summed in int16) and vpmaddwd; u = q + 128 times xq could overflow the int16 pair sum
//     (2 * 255 * 127), so the kernel turns u back into q (u ^ 0x80) and multiplies |xq| by q * sign(xq)
//     (|pair sum| <= 2 * 127 * 127; q and xq lie in [-127, 127], PackedLinear refuses -128). It sums q * xd,
//     not u * xd: linear.cpp passes it a zero shift.
//   int4: per block of 64 inputs, each 32-byte half of a vector of nibble pairs unpacks into two u8 quad groups
//     (linear.h); vpmaddubsw multiplies them into the activation quads (u <= 15: the two groups' pair sums add in
//     int16 exactly, |.| <= 4 * 15 * 127), vpmaddwd sums them into int32, and acc = fma(float(i - offset[b]),
//     ws[b] * sx[b], acc) as the other ISAs.
// Compiled with a function-level target attribute; linear.cpp calls it only on CPUs with AVX2, FMA and F16C.
// Tests: tests/test_cpu_linear.py (run with the ISA forced to avx2).
#include <immintrin.h>

#include <cstddef>

#include "cpu/linear.h"

#define AVX2_FMA __attribute__((target("avx2,fma,f16c")))

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

struct F16 {  // IEEE half bits
  static constexpr int G = 1;
  using T = uint16_t;
  AVX2_FMA static void weights(const uint16_t* w, __m256 (&out)[1]) {
    out[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  }
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

// Into L2, the line at k-group g of the panel after this tile's (next = Problem::l2_next, see run_tiles). Measured on
// the 2-core EPYC with the AVX2 kernels forced, GPT-2 124M's 48 matrices: fp32 / bf16 / int8 at 3 rows 1.04 / 1.25 /
// 1.08x, 8 rows 1.12 / 1.22 / 1.13x, 32 rows 1.02-1.05x.
AVX2_FMA inline void prefetch_next(const std::byte* next, int64_t g) {
  if (next) _mm_prefetch(reinterpret_cast<const char*>(next + g * kPanel * 4), _MM_HINT_T1);
}

// A tile of up to 6 rows multiplies both halves of a panel per k-group (2 x M x C accumulators); a taller one (7 or 8
// rows) makes one pass over K per half, with M accumulators (of 16 ymm: M + the group's G weight vectors + a
// broadcast): the first pass streams the panel from memory, the second re-reads it from cache, so 8 rows read the
// weights from memory once and broadcast each activation twice. Each output's sum runs over k in the same order
// either way (the outputs are bit-identical to the 3-row tiles this replaced). Measured on the 2-core EPYC, AVX2
// forced, GPT-2 124M's 48 matrices, three alternating runs each, medians: fp32 at 5 / 8 / 16 rows 1.27 / 1.12 /
// 1.16x the 3-row tiles (8 rows had been 3 + 3 + 2: the panel streamed once and re-read twice), bf16 0.99 / 1.13 /
// 1.06x (its weight decoding keeps it nearer the compute bound); 1 and 3 rows unchanged.
template <class D>
struct Tiles {
  static constexpr int kR = 1, kM = 8;
  static constexpr int64_t panels(int64_t) { return 1; }
  template <int R, int M>
  AVX2_FMA static void tile(const Problem& p, int64_t n, int64_t panel) {
    static_assert(R == 1, "one panel per tile");
    constexpr int G = D::G;
    constexpr int H = M <= 6 ? 2 : 1;  // halves per pass
    // accumulators per (half, row): one per k of a group for a single row, where the FMAs of a group would
    // otherwise wait on each other (bf16: 2 chained FMAs per 32 bytes of weights)
    constexpr int C = M == 1 ? G : 1;
    const auto* w = static_cast<const typename D::T*>(p.w) + panel * p.groups * kPanel * G;
    const float* x = p.x.xf + n * p.x.ld;
    const int64_t groups = (p.K + G - 1) / G;  // packed groups past K hold zeros: skip them
    __m256 sum[1][2][M];
    for (int h0 = 0; h0 < 2; h0 += H) {
      __m256 acc[H][M][C];
#pragma GCC unroll 16
      for (int i = 0; i < H * M * C; ++i) (&acc[0][0][0])[i] = _mm256_setzero_ps();
      const std::byte* next = h0 == 0 ? p.l2_next : nullptr;
      for (int64_t g = 0; g < groups; ++g) {
        prefetch_next(next, g);
#pragma GCC unroll 2
        for (int h = 0; h < H; ++h) {
          __m256 wv[G];
          D::weights(w + (g * kPanel + 8 * (h0 + h)) * G, wv);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
            for (int j = 0; j < G; ++j)
              acc[h][m][j % C] = _mm256_fmadd_ps(wv[j], _mm256_set1_ps(x[m * p.x.ld + g * G + j]), acc[h][m][j % C]);
        }
      }
#pragma GCC unroll 2
      for (int h = 0; h < H; ++h)
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          sum[0][h0 + h][m] = acc[h][m][0];
#pragma GCC unroll 2
          for (int c = 1; c < C; ++c) sum[0][h0 + h][m] = _mm256_add_ps(sum[0][h0 + h][m], acc[h][m][c]);
        }
    }
    store_tile<1, M>(p, n, panel, sum);
  }
};

struct Int8Tiles {
  static constexpr int kR = 1, kM = 2;  // int32 block sums and fp32 totals: 4 * M of the 16 registers
  static constexpr int64_t panels(int64_t) { return 1; }
  template <int R, int M>
  AVX2_FMA static void tile(const Problem& p, int64_t n, int64_t panel) {
    const auto [stride, w, x, sx] = Int8Operands(p, n, panel);
    constexpr int64_t quads = kInt8Block / 4;
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
    __m256 acc[R][2][M];
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h)
        for (int m = 0; m < M; ++m) acc[r][h][m] = _mm256_setzero_ps();
    const std::byte* next = p.l2_next;
    for (int64_t b = 0; b < p.x.blocks; ++b) {
      __m256i dot[R][2][M];
      for (int r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h)
          for (int m = 0; m < M; ++m) dot[r][h][m] = _mm256_setzero_si256();
      for (int64_t g = b * quads; g < (b + 1) * quads; ++g) {
        prefetch_next(next, g);
        __m256i xv[M], xabs[M];
        for (int m = 0; m < M; ++m) {
          xv[m] = _mm256_set1_epi32(static_cast<int>(x[m * p.x.ld + g]));
          xabs[m] = _mm256_abs_epi8(xv[m]);
        }
        for (int r = 0; r < R; ++r)
          for (int h = 0; h < 2; ++h) {
            const __m256i q = _mm256_xor_si256(
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * stride + (g * kPanel + 8 * h) * 4)), flip);
            for (int m = 0; m < M; ++m) {
              const __m256i pairs = _mm256_maddubs_epi16(xabs[m], _mm256_sign_epi8(q, xv[m]));  // int16, exact
              dot[r][h][m] = _mm256_add_epi32(dot[r][h][m], _mm256_madd_epi16(pairs, ones));
            }
          }
      }
      for (int m = 0; m < M; ++m) {
        const __m256 scale = _mm256_set1_ps(sx[m * p.x.blocks + b]);
        for (int r = 0; r < R; ++r)
          for (int h = 0; h < 2; ++h)
            acc[r][h][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][h][m]), scale, acc[r][h][m]);
      }
    }
    store_tile<R, M>(p, n, panel, acc);
  }
};

struct Int4Tiles {
  static constexpr int kR = 1, kM = 2;  // int32 block sums and fp32 totals, 4 * M of the 16 registers
  static constexpr int64_t panels(int64_t) { return 1; }
  template <int R, int M>
  AVX2_FMA static void tile(const Problem& p, int64_t n, int64_t panel) {
    static_assert(R == 1, "one panel per tile");
    const auto [stride, w, x, sx, offset] = Int4Operands(p, n, panel);
    const __m256i nibble = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[1][2][M];
    for (int h = 0; h < 2; ++h)
      for (int m = 0; m < M; ++m) acc[0][h][m] = _mm256_setzero_ps();
    const std::byte* next = p.l2_next;
    for (int64_t b = 0; b < p.x.blocks; ++b) {
      const uint8_t* block = w + b * kInt4BlockBytes;
      const uint32_t* xb = x + b * (kInt8Block / 4);
      __m256i dot[2][M];
      for (int h = 0; h < 2; ++h)
        for (int m = 0; m < M; ++m) dot[h][m] = _mm256_setzero_si256();
      prefetch_next(next, b * kInt4Lines + 8);  // the block's scales
      for (int i = 0; i < 8; ++i) {
        prefetch_next(next, b * kInt4Lines + i);
        __m256i xl[M], xh[M];
        for (int m = 0; m < M; ++m) {
          xl[m] = _mm256_set1_epi32(static_cast<int>(xb[m * p.x.ld + i]));
          xh[m] = _mm256_set1_epi32(static_cast<int>(xb[m * p.x.ld + i + 8]));
        }
        for (int h = 0; h < 2; ++h) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + i * 64 + 32 * h));
          const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
          for (int m = 0; m < M; ++m) {
            const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl[m]), _mm256_maddubs_epi16(hi, xh[m]));
            dot[h][m] = _mm256_add_epi32(dot[h][m], _mm256_madd_epi16(pairs, ones));
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        const __m256 s = _mm256_set1_ps(sx[m * p.x.blocks + b]);
        const __m256i off = _mm256_set1_epi32(offset[m * p.x.blocks + b]);
        for (int h = 0; h < 2; ++h) {
          const __m256 ws = _mm256_loadu_ps(reinterpret_cast<const float*>(block + kInt4Nibbles) + 8 * h);
          acc[0][h][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(dot[h][m], off)), _mm256_mul_ps(ws, s),
                                         acc[0][h][m]);
        }
      }
    }
    store_tile<1, M>(p, n, panel, acc);
  }
};

}  // namespace

MicroKernel avx2_kernel(WeightType t) {
  switch (t) {
    case WeightType::f32: return &run_tiles<Tiles<F32>>;
    case WeightType::f16: return &run_tiles<Tiles<F16>>;
    case WeightType::bf16: return &run_tiles<Tiles<Bf16>>;
    case WeightType::int8: return &run_tiles<Int8Tiles>;
    case WeightType::int4: return &run_tiles<Int4Tiles>;
  }
  return nullptr;
}

}  // namespace aigc_rt::cpu::linear_detail
