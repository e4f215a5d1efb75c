// AVX-512 micro-kernels of the linear layer (see linear.h for the packed layout and the contract):
//   fp32: acc[16 outputs] += w[panel, k, :] * broadcast(x[k])                    (vfmadd231ps)
//   fp16: the same, each 32-byte group of 16 halves widened exactly first        (vcvtph2ps)
//   bf16: acc += w[panel, k/2, :, 0:2] . broadcast(bf16 pair x[k:k+2])          (vdpbf16ps, avx512_bf16)
//         or, without avx512_bf16 ("avx512f"), each pair widened to fp32 in registers and vfmadd231ps as fp32
//   int8: per block b of 64 inputs, i = sum over quads of (q + 128)[panel, k/4, :, 0:4] . xq[k:k+4] (vpdpbusd,
//         exact in int32), then acc += float(i) * sx[b]                           (VNNI)
//   int4: per block b, each 64-byte vector of nibble pairs unpacks (& 0xf, >> 4 & 0xf) into two u8 quad groups
//         (linear.h), i = sum of their vpdpbusd with the activation quads, then
//         acc = fma(float(i - offset[b]), ws[b] * sx[b], acc)                     (VNNI)
// Each function carries its own target attribute, so the library loads on any x86-64 CPU; linear.cpp
// calls these only after __builtin_cpu_supports says the CPU has the features.
// Tests: tests/test_cpu_linear.py (every ISA the machine has, against plain-PyTorch fp32 math).
// gcc 12 warns about the deliberately undefined pass-through operand inside its own intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "cpu/linear.h"

#define AIGC_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,fma"
#define AVX512_F32 __attribute__((target(AIGC_AVX512)))
#define AVX512_BF16 __attribute__((target(AIGC_AVX512 ",avx512bf16")))
#define AVX512_VNNI __attribute__((target(AIGC_AVX512 ",avx512vnni")))

namespace aigc_rt::cpu::linear_detail {
namespace {

// bytes ahead of the current position that each panel is prefetched into L1
constexpr int64_t kPrefetchBytes = 1024;

template <int R, int M>
AVX512_F32 inline void store_tile(const Problem& p, int64_t n, int64_t panel, __m512 (&acc)[R][M]) {
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const int64_t o = (panel + r) * kPanel;
    const __mmask16 valid = p.O - o >= kPanel ? __mmask16(0xffff) : __mmask16((1u << (p.O - o)) - 1);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) _mm512_mask_storeu_ps(p.y + (n + m) * p.ldy + o, valid, acc[r][m]);
  }
}

template <class T>
AVX512_F32 inline void prefetch(const T* at) {
  _mm_prefetch(reinterpret_cast<const char*>(at) + kPrefetchBytes, _MM_HINT_T0);
}

// Into L2, the 64-byte line of each of the R panels after this tile's (p.l2_next, see run_tiles) at k-group g:
// the next panel group streams from memory while this tile computes from cache.
template <int R>
AVX512_F32 inline void prefetch_next(const std::byte* next, int64_t groups, int64_t g) {
  if (!next) return;
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    _mm_prefetch(reinterpret_cast<const char*>(next + (r * groups + g) * kPanel * 4), _MM_HINT_T1);
}

// One activation row (M = 1): a tile of R panels streams R places of the weight at once, and with nothing to reuse
// across panels one stream per thread runs faster, so row tiles take one panel (panels(1) = 1; measured on the
// 2-core EPYC (Zen 5) over the 355M model's matrices, when the machine gave ~57 GB/s to torch.sum: R = 1 vs 4
// streamed fp32 at 58 vs 57 GB/s, bf16 58 vs 53.5, int8 51 vs 43.5 (int8 also at 2 rows: 47 vs 41); no difference
// when it gave ~34 GB/s). With no second row to interleave either, a single accumulator per panel chains every
// multiply-add on the previous one: one 64-byte weight vector per instruction latency. So a row tile keeps kChains
// accumulators per panel over interleaved k-groups and adds them at the end, and leaves the stream to the hardware
// prefetchers (the multi-row tiles' software prefetch slowed a lone row down). Measured on the 2-core EPYC (Zen 5),
// a 124M-sized layer stack at one row, 1 -> 4 chains from L3: fp32 111 -> 124 GB/s, bf16 75 -> 121 (vdpbf16ps's
// latency was the bound), int8 108 -> 101; without vs with the software prefetch from DRAM (~49 GB/s probed): fp32
// 53.5 vs 51.5, bf16 52.4 vs 49.1, int8 50.9 vs 43.0 (at 8 rows the prefetch still pays for int8: 25.1 vs 21.8
// GB/s).
constexpr int kChains = 4;

template <int R>
AVX512_F32 inline void store_row(const Problem& p, int64_t n, int64_t panel, __m512 (&acc)[R][kChains]) {
  __m512 sum[R][1];
  static_assert(kChains == 4, "the fp32 sum below is a pairwise tree of 4");
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
    sum[r][0] = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
  store_tile<R, 1>(p, n, panel, sum);
}

// tile<R, M> (run_tiles' entry) as T's row<R> for a single activation row, else T's rows<R, M>
template <class T>
struct RowSplit {
  template <int R, int M>
  static void tile(const Problem& p, int64_t n, int64_t panel) {
    if constexpr (M == 1)
      T::template row<R>(p, n, panel);
    else
      T::template rows<R, M>(p, n, panel);
  }
};

// Weights a kernel widens to fp32 in registers before vfmadd231ps: W::load reads one k-group of a panel (16 rows x G k,
// 64 bytes or fewer), W::value(raw, j) gives the 16 rows' weights at its j-th k, exactly.
struct F32Weights {  // as stored
  using T = float;
  using Raw = __m512;
  static constexpr int G = 1;
  AVX512_F32 static Raw load(const float* w) { return _mm512_loadu_ps(w); }
  AVX512_F32 static __m512 value(Raw v, int) { return v; }
};

struct F16Weights {  // IEEE halves (their bits), widened by vcvtph2ps
  using T = uint16_t;
  using Raw = __m512;
  static constexpr int G = 1;
  AVX512_F32 static Raw load(const uint16_t* w) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  }
  AVX512_F32 static __m512 value(Raw v, int) { return v; }
};

// bf16 pairs on a CPU without avx512_bf16 (Skylake-SP, Cascade Lake, Ice Lake, or a VM that hides the flag): the AVX2
// kernel's math at twice its width, the even k by << 16 and the odd k by & 0xffff0000, multiplying fp32 activations
// already rounded through bf16 (linear.cpp prepares xf so for ISAs below avx512)
struct Bf16Weights {
  using T = uint16_t;
  using Raw = __m512i;
  static constexpr int G = 2;
  AVX512_F32 static Raw load(const uint16_t* w) { return _mm512_loadu_si512(w); }
  AVX512_F32 static __m512 value(Raw v, int j) {
    const __m512i high_half = _mm512_set1_epi32(int(0xffff0000u));
    return _mm512_castsi512_ps(j == 0 ? _mm512_slli_epi32(v, 16) : _mm512_and_si512(v, high_half));
  }
};

// fp32, fp16 and (without avx512_bf16) bf16 weights, W above: fp32 multiply-adds of the widened weights
template <class W>
struct FmaTiles : RowSplit<FmaTiles<W>> {
  static constexpr int kR = 4, kM = 8, G = W::G;
  // R * M accumulators + R raw groups + a widened one <= 30 registers. A lone row of 2-byte weights streams two panels
  // at once (fp32 and the other tiles here one: see above): on the 2-core Xeon of 2026-11-30 (AVX-512 without bf16)
  // GPT-2 124M bf16 decoded batch 1 at 1.13-1.42x one panel's speed (three alternating runs each) and fp16's matrices
  // ran at 1.2x (four); fp32 and int8 showed no consistent difference there; fp16 not measured on an AMD CPU.
  static constexpr int64_t panels(int64_t rows) {
    return rows == 1 ? (sizeof(typename W::T) == 2 ? 2 : 1) : rows > 6 ? 3 : 4;
  }

  template <int R>
  AVX512_F32 static void row(const Problem& p, int64_t n, int64_t panel) {  // chains: the k of kChains / G groups
    constexpr int S = kChains / G;
    const int64_t stride = p.groups * kPanel * G;  // elements per panel
    const typename W::T* w = static_cast<const typename W::T*>(p.w) + panel * stride;
    const float* x = p.x.xf + n * p.x.ld;
    __m512 acc[R][kChains];
#pragma GCC unroll 16
    for (int i = 0; i < R * kChains; ++i) acc[i / kChains][i % kChains] = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + S <= p.groups; g += S) {
#pragma GCC unroll 4
      for (int c = 0; c < S; ++c) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const typename W::Raw raw = W::load(w + r * stride + (g + c) * kPanel * G);
#pragma GCC unroll 2
          for (int j = 0; j < G; ++j)
            acc[r][c * G + j] =
                _mm512_fmadd_ps(W::value(raw, j), _mm512_set1_ps(x[(g + c) * G + j]), acc[r][c * G + j]);
        }
      }
    }
    for (; g < p.groups; ++g) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const typename W::Raw raw = W::load(w + r * stride + g * kPanel * G);
#pragma GCC unroll 2
        for (int j = 0; j < G; ++j)
          acc[r][j] = _mm512_fmadd_ps(W::value(raw, j), _mm512_set1_ps(x[g * G + j]), acc[r][j]);
      }
    }
    store_row<R>(p, n, panel, acc);
  }

  template <int R, int M>
  AVX512_F32 static void rows(const Problem& p, int64_t n, int64_t panel) {
    const int64_t stride = p.groups * kPanel * G;  // elements per panel
    const typename W::T* w = static_cast<const typename W::T*>(p.w) + panel * stride;
    const float* x = p.x.xf + n * p.x.ld;
    __m512 acc[R][M];
#pragma GCC unroll 32
    for (int i = 0; i < R * M; ++i) acc[i / M][i % M] = _mm512_setzero_ps();
    const std::byte* next = p.l2_next;
    for (int64_t g = 0; g < p.groups; ++g) {
      typename W::Raw wv[R];
      prefetch_next<R>(next, p.groups, g);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        prefetch(w + r * stride + g * kPanel * G);
        wv[r] = W::load(w + r * stride + g * kPanel * G);
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
        for (int j = 0; j < G; ++j) {
          const __m512 v = W::value(wv[r], j);
#pragma GCC unroll 8
          for (int m = 0; m < M; ++m)
            acc[r][m] = _mm512_fmadd_ps(v, _mm512_set1_ps(x[m * p.x.ld + g * G + j]), acc[r][m]);
        }
    }
    store_tile<R, M>(p, n, panel, acc);
  }
};

struct Bf16Tiles : RowSplit<Bf16Tiles> {
  static constexpr int kR = 4, kM = 8;
  static constexpr int64_t panels(int64_t rows) { return rows == 1 ? 1 : rows > 6 ? 3 : 4; }
  template <int R>
  AVX512_BF16 static void row(const Problem& p, int64_t n, int64_t panel) {  // p.groups: a multiple of kChains
    const int64_t stride = p.groups * kPanel * 2;
    const uint16_t* w = static_cast<const uint16_t*>(p.w) + panel * stride;
    const uint32_t* x = p.x.xg + n * p.x.ld;
    __m512 acc[R][kChains];
#pragma GCC unroll 16
    for (int i = 0; i < R * kChains; ++i) acc[i / kChains][i % kChains] = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.groups; g += kChains) {
#pragma GCC unroll 4
      for (int c = 0; c < kChains; ++c) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[g + c]));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
          acc[r][c] =
              _mm512_dpbf16_ps(acc[r][c], (__m512bh)_mm512_loadu_si512(w + r * stride + (g + c) * kPanel * 2), xv);
      }
    }
    store_row<R>(p, n, panel, acc);
  }

  template <int R, int M>
  AVX512_BF16 static void rows(const Problem& p, int64_t n, int64_t panel) {
    const int64_t stride = p.groups * kPanel * 2;  // bf16 elements per panel
    const uint16_t* w = static_cast<const uint16_t*>(p.w) + panel * stride;
    const uint32_t* x = p.x.xg + n * p.x.ld;
    __m512 acc[R][M];
#pragma GCC unroll 32
    for (int i = 0; i < R * M; ++i) acc[i / M][i % M] = _mm512_setzero_ps();
    const std::byte* next = p.l2_next;
    for (int64_t g = 0; g < p.groups; ++g) {
      __m512bh wv[R];
      prefetch_next<R>(next, p.groups, g);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        prefetch(w + r * stride + g * kPanel * 2);
        wv[r] = (__m512bh)_mm512_loadu_si512(w + r * stride + g * kPanel * 2);
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * p.x.ld + g]));
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
      }
    }
    store_tile<R, M>(p, n, panel, acc);
  }
};

struct Int8Tiles : RowSplit<Int8Tiles> {
  static constexpr int kR = 4, kM = 8;
  // int32 block sums and fp32 totals: 2 * R * M <= 28 registers
  static constexpr int64_t panels(int64_t rows) { return rows > 3 && rows <= 7 ? 2 : 1; }
  template <int R>
  AVX512_VNNI static void row(const Problem& p, int64_t n, int64_t panel) {  // int32 chains: the same sums, exactly
    const auto [stride, w, x, sx] = Int8Operands(p, n, panel);
    constexpr int64_t quads = kInt8Block / 4;
    static_assert(quads % kChains == 0);
    __m512 acc[R][1];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r][0] = _mm512_setzero_ps();
    for (int64_t b = 0; b < p.x.blocks; ++b) {
      __m512i dot[R][kChains];
#pragma GCC unroll 16
      for (int i = 0; i < R * kChains; ++i) dot[i / kChains][i % kChains] = _mm512_setzero_si512();
      for (int64_t g = b * quads; g < (b + 1) * quads; g += kChains) {
#pragma GCC unroll 4
        for (int c = 0; c < kChains; ++c) {
          const __m512i xv = _mm512_set1_epi32(static_cast<int>(x[g + c]));
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r)
            dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], _mm512_loadu_si512(w + r * stride + (g + c) * kPanel * 4), xv);
        }
      }
      const __m512 scale = _mm512_set1_ps(sx[b]);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        __m512i sum = dot[r][0];
#pragma GCC unroll 4
        for (int c = 1; c < kChains; ++c) sum = _mm512_add_epi32(sum, dot[r][c]);
        acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r][0]);
      }
    }
    store_tile<R, 1>(p, n, panel, acc);
  }

  template <int R, int M>
  AVX512_VNNI static void rows(const Problem& p, int64_t n, int64_t panel) {
    const auto [stride, w, x, sx] = Int8Operands(p, n, panel);
    constexpr int64_t quads = kInt8Block / 4;
    __m512 acc[R][M];
#pragma GCC unroll 32
    for (int i = 0; i < R * M; ++i) acc[i / M][i % M] = _mm512_setzero_ps();
    const std::byte* next = p.l2_next;
    for (int64_t b = 0; b < p.x.blocks; ++b) {
      __m512i dot[R][M];
#pragma GCC unroll 32
      for (int i = 0; i < R * M; ++i) dot[i / M][i % M] = _mm512_setzero_si512();
      for (int64_t g = b * quads; g < (b + 1) * quads; ++g) {
        __m512i wv[R];
        prefetch_next<R>(next, p.groups, g);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          prefetch(w + r * stride + g * kPanel * 4);
          wv[r] = _mm512_loadu_si512(w + r * stride + g * kPanel * 4);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m512i xv = _mm512_set1_epi32(static_cast<int>(x[m * p.x.ld + g]));
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) dot[r][m] = _mm512_dpbusd_epi32(dot[r][m], wv[r], xv);
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m512 scale = _mm512_set1_ps(sx[m * p.x.blocks + b]);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][m]), scale, acc[r][m]);
      }
    }
    store_tile<R, M>(p, n, panel, acc);
  }
};

// int4: acc = fma(float(dot - offset), ws * sx, acc), one block's contribution to 16 outputs, the same float operations
// in every ISA
AVX512_F32 inline __m512 add_block(__m512 acc, __m512i dot, const uint8_t* block, float sx, int32_t offset) {
  const __m512 ws = _mm512_loadu_ps(reinterpret_cast<const float*>(block + kInt4Nibbles));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot, _mm512_set1_epi32(offset))),
                         _mm512_mul_ps(ws, _mm512_set1_ps(sx)), acc);
}

struct Int4Tiles : RowSplit<Int4Tiles> {
  static constexpr int kR = 2, kM = 8;
  // int32 block sums and fp32 totals, 2 * R * M, + 2 * R unpacked weights <= 30 registers
  static constexpr int64_t panels(int64_t rows) { return rows > 3 && rows <= 6 ? 2 : 1; }

  template <int R>
  AVX512_VNNI static void row(const Problem& p, int64_t n, int64_t panel) {  // 4 int32 chains per panel
    const auto [stride, w, x, sx, offset] = Int4Operands(p, n, panel);
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    __m512 acc[R][1];
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r) acc[r][0] = _mm512_setzero_ps();
    for (int64_t b = 0; b < p.x.blocks; ++b) {
      const uint8_t* block = w + b * kInt4BlockBytes;
      const uint32_t* xb = x + b * (kInt8Block / 4);
      __m512i dot[R][4];
#pragma GCC unroll 8
      for (int i = 0; i < R * 4; ++i) dot[i / 4][i % 4] = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        const __m512i lo = _mm512_set1_epi32(static_cast<int>(xb[i]));
        const __m512i hi = _mm512_set1_epi32(static_cast<int>(xb[i + 8]));
        const int c = 2 * (i % 2);
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) {
          const __m512i v = _mm512_loadu_si512(block + r * stride + i * 64);
          dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], _mm512_and_si512(v, nibble), lo);
          dot[r][c + 1] = _mm512_dpbusd_epi32(dot[r][c + 1], _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble), hi);
        }
      }
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
        const __m512i sum =
            _mm512_add_epi32(_mm512_add_epi32(dot[r][0], dot[r][1]), _mm512_add_epi32(dot[r][2], dot[r][3]));
        acc[r][0] = add_block(acc[r][0], sum, block + r * stride, sx[b], offset[b]);
      }
    }
    store_tile<R, 1>(p, n, panel, acc);
  }

  template <int R, int M>
  AVX512_VNNI static void rows(const Problem& p, int64_t n, int64_t panel) {
    const auto [stride, w, x, sx, offset] = Int4Operands(p, n, panel);
    const __m512i nibble = _mm512_set1_epi8(0x0f);
    __m512 acc[R][M];
#pragma GCC unroll 16
    for (int i = 0; i < R * M; ++i) acc[i / M][i % M] = _mm512_setzero_ps();
    const std::byte* next = p.l2_next;
    for (int64_t b = 0; b < p.x.blocks; ++b) {
      const uint8_t* block = w + b * kInt4BlockBytes;
      const uint32_t* xb = x + b * (kInt8Block / 4);
      __m512i dot[R][M];
#pragma GCC unroll 16
      for (int i = 0; i < R * M; ++i) dot[i / M][i % M] = _mm512_setzero_si512();
      prefetch_next<R>(next, p.groups, b * kInt4Lines + 8);  // the block's scales
      for (int i = 0; i < 8; ++i) {
        __m512i lo[R], hi[R];
        prefetch_next<R>(next, p.groups, b * kInt4Lines + i);
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) {
          prefetch(block + r * stride + i * 64);
          const __m512i v = _mm512_loadu_si512(block + r * stride + i * 64);
          lo[r] = _mm512_and_si512(v, nibble);
          hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m512i xl = _mm512_set1_epi32(static_cast<int>(xb[m * p.x.ld + i]));
          const __m512i xh = _mm512_set1_epi32(static_cast<int>(xb[m * p.x.ld + i + 8]));
#pragma GCC unroll 2
          for (int r = 0; r < R; ++r)
            dot[r][m] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(dot[r][m], lo[r], xl), hi[r], xh);
        }
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r)
          acc[r][m] = add_block(acc[r][m], dot[r][m], block + r * stride, sx[m * p.x.blocks + b],
                                offset[m * p.x.blocks + b]);
    }
    store_tile<R, M>(p, n, panel, acc);
  }
};

// int8 and int4 without VNNI (the avx512f level: AVX-512 BW), as the AVX2 kernels on 16 lanes: vpmaddubsw multiplies
// unsigned by signed bytes into exact int16 pair sums, vpmaddwd by ones adds the pairs into int32.
//   int8: u = q + 128 would overflow the pair sum (2 * 255 * 127), so q = u ^ 0x80 is negated where xq < 0 and
//         multiplied by |xq| (|pair sum| <= 2 * 127 * 127): the tile sums q * xd, and linear.cpp passes no shift.
//   int4: the unpacked nibbles (u <= 15) by xq directly; the two quad groups' pair sums add in int16 exactly.
// One panel and up to 4 rows a tile (a mask, a broadcast and the sums per row stay in registers); 8 rows are two
// tiles, the second reading the panel from cache.
struct Int8BwTiles {
  static constexpr int kR = 1, kM = 4;
  static constexpr int64_t panels(int64_t) { return 1; }
  template <int R, int M>
  AVX512_F32 static void tile(const Problem& p, int64_t n, int64_t panel) {
    static_assert(R == 1, "one panel per tile");
    const auto [stride, w, x, sx] = Int8Operands(p, n, panel);
    constexpr int64_t quads = kInt8Block / 4;
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80)), ones = _mm512_set1_epi16(1);
    __m512 acc[1][M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[0][m] = _mm512_setzero_ps();
    const std::byte* next = p.l2_next;
    for (int64_t b = 0; b < p.x.blocks; ++b) {
      __m512i dot[M];
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) dot[m] = _mm512_setzero_si512();
      for (int64_t g = b * quads; g < (b + 1) * quads; ++g) {
        prefetch_next<1>(next, p.groups, g);
        prefetch(w + g * kPanel * 4);
        const __m512i q = _mm512_xor_si512(_mm512_loadu_si512(w + g * kPanel * 4), flip);
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          const __m512i xv = _mm512_set1_epi32(static_cast<int>(x[m * p.x.ld + g]));
          const __m512i qs = _mm512_mask_sub_epi8(q, _mm512_movepi8_mask(xv), _mm512_setzero_si512(), q);
          const __m512i pairs = _mm512_maddubs_epi16(_mm512_abs_epi8(xv), qs);  // int16, exact
          dot[m] = _mm512_add_epi32(dot[m], _mm512_madd_epi16(pairs, ones));
        }
      }
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m)
        acc[0][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m]), _mm512_set1_ps(sx[m * p.x.blocks + b]), acc[0][m]);
    }
    store_tile<1, M>(p, n, panel, acc);
  }
};

struct Int4BwTiles {
  static constexpr int kR = 1, kM = 4;
  static constexpr int64_t panels(int64_t) { return 1; }
  template <int R, int M>
  AVX512_F32 static void tile(const Problem& p, int64_t n, int64_t panel) {
    static_assert(R == 1, "one panel per tile");
    const auto [stride, w, x, sx, offset] = Int4Operands(p, n, panel);
    const __m512i nibble = _mm512_set1_epi8(0x0f), ones = _mm512_set1_epi16(1);
    __m512 acc[1][M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[0][m] = _mm512_setzero_ps();
    const std::byte* next = p.l2_next;
    for (int64_t b = 0; b < p.x.blocks; ++b) {
      const uint8_t* block = w + b * kInt4BlockBytes;
      const uint32_t* xb = x + b * (kInt8Block / 4);
      __m512i dot[M];
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) dot[m] = _mm512_setzero_si512();
      prefetch_next<1>(next, p.groups, b * kInt4Lines + 8);  // the block's scales
      for (int i = 0; i < 8; ++i) {
        prefetch_next<1>(next, p.groups, b * kInt4Lines + i);
        prefetch(block + i * 64);
        const __m512i v = _mm512_loadu_si512(block + i * 64);
        const __m512i lo = _mm512_and_si512(v, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
#pragma GCC unroll 4
        for (int m = 0; m < M; ++m) {
          const __m512i xl = _mm512_set1_epi32(static_cast<int>(xb[m * p.x.ld + i]));
          const __m512i xh = _mm512_set1_epi32(static_cast<int>(xb[m * p.x.ld + i + 8]));
          const __m512i pairs = _mm512_add_epi16(_mm512_maddubs_epi16(lo, xl), _mm512_maddubs_epi16(hi, xh));
          dot[m] = _mm512_add_epi32(dot[m], _mm512_madd_epi16(pairs, ones));
        }
      }
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m)
        acc[0][m] = add_block(acc[0][m], dot[m], block, sx[m * p.x.blocks + b], offset[m * p.x.blocks + b]);
    }
    store_tile<1, M>(p, n, panel, acc);
  }
};

}  // namespace

AVX512_F32 int32_t quantize_block_avx512(const float* x, int8_t* q, float* s) {
  constexpr int V = kInt8Block / 16;
  __m512 v[V], amax = _mm512_setzero_ps(), poison = _mm512_setzero_ps();  // poison: NaN iff some x is NaN/inf
#pragma GCC unroll 4
  for (int i = 0; i < V; ++i) {
    v[i] = _mm512_loadu_ps(x + 16 * i);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
    poison = _mm512_add_ps(poison, _mm512_mul_ps(_mm512_setzero_ps(), v[i]));
  }
  const float m = _mm512_reduce_max_ps(amax), bad = _mm512_reduce_add_ps(poison);
  if (!std::isfinite(bad) || m == 0.f) {
    std::fill(q, q + kInt8Block, int8_t(0));
    *s = bad;
    return 0;
  }
  const __m512 inv = _mm512_set1_ps(127.f / m), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-127.f);
  __m512i sum = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int i = 0; i < V; ++i) {  // nearbyint (ties to even), then clamp, as the scalar loop
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i qi = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi));
    sum = _mm512_add_epi32(sum, qi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * i), _mm512_cvtsepi32_epi8(qi));
  }
  *s = m / 127.f;
  return _mm512_reduce_add_epi32(sum);
}

MicroKernel avx512_kernel(WeightType t) {
  switch (t) {
    case WeightType::f32: return &run_tiles<FmaTiles<F32Weights>>;
    case WeightType::f16: return &run_tiles<FmaTiles<F16Weights>>;
    case WeightType::bf16: return &run_tiles<Bf16Tiles>;
    case WeightType::int8: return &run_tiles<Int8Tiles>;
    case WeightType::int4: return &run_tiles<Int4Tiles>;
  }
  return nullptr;
}

MicroKernel avx512f_kernel(WeightType t) {
  switch (t) {
    case WeightType::f32: return &run_tiles<FmaTiles<F32Weights>>;
    case WeightType::f16: return &run_tiles<FmaTiles<F16Weights>>;
    case WeightType::bf16: return &run_tiles<FmaTiles<Bf16Weights>>;
    case WeightType::int8: return &run_tiles<Int8BwTiles>;
    case WeightType::int4: return &run_tiles<Int4BwTiles>;
  }
  return nullptr;
}

}  // namespace aigc_rt::cpu::linear_detail
