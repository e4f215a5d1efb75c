// Internal interface between the linear host code (linear.cpp) and its per-ISA micro-kernels
// (linear_avx512.cpp, linear_avx2.cpp; the portable C++ one is in linear.cpp).
//
// A micro-kernel computes raw dot products for one thread's share of the work:
//   y[n, o] = sum_k xp[n, k] * wp[o, k]        for n in [n0, n1), o in [o0, o1)
// where xp is the activation row as the kernel wants it prepared (PreparedX) and wp the decoded weight.
// The epilogue (scale, bias, GELU) is applied afterwards by linear.cpp, on rows that are still in cache.
#pragma once
#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

namespace aigc_rt::cpu::linear_detail {

// int8 weights: rows stored as uint8 (q + 128), padded with 128 (i.e. q = 0) to a multiple of this;
// activations are quantised to int8 per block of this many inputs (the VNNI path).
constexpr int64_t kInt8Block = 64;
// bf16 activations (the avx512_bf16 path) are padded with zeros to a multiple of this many inputs.
constexpr int64_t kBf16Pad = 32;

enum class WeightType { f32, bf16, int8 };

// Activations prepared once per call (see prepare_x in linear.cpp):
//   f32 weights:            xf = x
//   bf16 weights, avx512:   xh = bf16(x), rows padded to kBf16Pad with zeros          (vdpbf16ps)
//   bf16 weights, else:     xf = float(bf16(x))                                       (same math, fp32 FMA)
//   int8 weights, avx512:   xq = round(x / sx[b]) in int8 per block b of kInt8Block, rows padded with 0;
//                           the kernel accumulates sum_b sx[b] * sum_k (q[o, k] + 128) * xq[k]
//                           (vpdpbusd), and the epilogue subtracts shift = 128 * sum_b sx[b] * sum_k xq[k]
//   int8 weights, else:     xf = xq * sx[b] (the same quantised activations, dequantised), weights q
struct PreparedX {
  const float* xf = nullptr;
  const uint16_t* xh = nullptr;
  const int8_t* xq = nullptr;
  const float* sx = nullptr;  // (N, K_pad / kInt8Block)
  int64_t ld = 0;             // row stride of xf / xh / xq, in elements
};

struct Problem {
  PreparedX x;
  const void* w;   // (O, ldw): float, uint16 (bf16 bits) or uint8 (q + 128)
  int64_t ldw;     // row stride of w, in elements (K, or K padded for int8)
  int64_t K;       // true input features
  float* y;        // (N, ldy)
  int64_t ldy;
};

using MicroKernel = void (*)(const Problem&, int64_t n0, int64_t n1, int64_t o0, int64_t o1);

// The loop every micro-kernel shares: register tiles of up to Tiles::kR weight rows x Tiles::kM activation
// rows, weight tiles outermost so each weight row is streamed from memory once per call of this function
// (and re-read from L1/L2 for the activation tiles). Tiles::tile<R, M>(p, n, o) computes one tile.
template <class Tiles>
void run_tiles(const Problem& p, int64_t n0, int64_t n1, int64_t o0, int64_t o1) {
  using TileFn = void (*)(const Problem&, int64_t, int64_t);
  constexpr int R = Tiles::kR, M = Tiles::kM;
  constexpr auto table = []<int... Rs>(std::integer_sequence<int, Rs...>) {
    constexpr auto row = []<int Rr, int... Ms>(std::integer_sequence<int, Ms...>) {
      return std::array<TileFn, M>{&Tiles::template tile<Rr, Ms + 1>...};
    };
    return std::array<std::array<TileFn, M>, R>{row.template operator()<Rs + 1>(std::make_integer_sequence<int, M>{})...};
  }(std::make_integer_sequence<int, R>{});
  for (int64_t o = o0; o < o1; o += R) {
    const int64_t r = std::min<int64_t>(R, o1 - o);
    for (int64_t n = n0; n < n1; n += M) table[r - 1][std::min<int64_t>(M, n1 - n) - 1](p, n, o);
  }
}

// Per ISA: the micro-kernel for each weight type.
MicroKernel avx512_kernel(WeightType t);
MicroKernel avx2_kernel(WeightType t);

}  // namespace aigc_rt::cpu::linear_detail
