// The contract between the convolution host code (conv.cpp: conv2d and conv_transpose) and its per-ISA
// micro-kernels (conv_avx512.cpp, conv_avx2.cpp). Plain C++: no torch, no intrinsics, so it is safe to include
// from translation units compiled for different instruction sets.
//
// One tile computes, for mr output pixels (rows) and one block of nr output channels (columns):
//   c[r][j] = act(bias[j] + sum_t sum_i a[t * mr + r][i] * b[t][i * nr + j])     i < cin, j < n_valid
// where t runs over the taps (input pixels) feeding the tile and a row pointer may point at zeros.
// Tests: tests/test_cpu_conv.py.
#pragma once
#include <cstdint>

namespace aigc_rt::cpu::conv {

// y = x, max(x, 0), tanh(x), x >= 0 ? x : slope * x, 1 / (1 + e^-x)
enum Act : int { kNone = 0, kRelu = 1, kTanh = 2, kLeakyRelu = 3, kSigmoid = 4 };
constexpr int kMaxRows = 12;    // largest mr of any ISA
constexpr int kMaxVectors = 4;  // nr = lanes * nv, nv in 1..kMaxVectors

struct TileArgs {
  int taps;                // number of (input pixel, weight panel) pairs
  int cin;                 // floats per input row = rows per weight panel
  const float* const* a;   // [taps * mr] input rows
  const float* const* b;   // [taps] weight panels, cin x nr, row-major
  const float* bias;       // nr floats, or nullptr for none
  float* const* c;         // [mr] output rows; the first n_valid floats of each are written
  int n_valid;             // 1..nr
  int act;                 // Act
  float slope;             // kLeakyRelu's negative slope
};
using TileFn = void (*)(const TileArgs&);
using ActFn = void (*)(float* x, int64_t n, int act, float slope);  // x[0:n] = act(x[0:n]) in place

struct Isa {
  const char* name;
  int lanes;                                       // floats per vector register
  int rows[kMaxVectors + 1];                       // mr of the tile kernel with nv vectors per row
  TileFn tile[kMaxVectors + 1][kMaxRows + 1];      // [nv][mr], mr in 1..rows[nv]
  ActFn act;
};

extern const Isa kAvx512;
extern const Isa kAvx2;

}  // namespace aigc_rt::cpu::conv
