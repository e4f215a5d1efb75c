// The contract between the convolution host code (conv.cpp: conv2d and conv_transpose) and its per-ISA
// micro-kernels (conv_avx512.cpp, conv_avx2.cpp). Plain C++: no torch, no intrinsics, so it is safe to include
// from translation units compiled for different instruction sets.
//
// One tile computes, for mr output pixels (rows) and one block of nr output channels (columns):
//   c[r][j] = act(bias[j] + sum_t sum_i a[t * mr + r][i] * b[t][i * nr + j])     i < cin, j < n_valid
// where t runs over the taps (input pixels) feeding the tile.
// fp32 tiles (tile): a rows and b panels of floats. bf16 tiles (tile_bf16): a rows of bf16, b panels of bf16
// pairs [ceil(cin / 2)][nr][2] (inputs i, i + 1 of a column side by side; a zero past an odd cin), the products
// exact and summed in fp32 (vdpbf16ps, or the same in two FMAs where the CPU lacks AVX512-BF16). c is fp32, or
// bf16 (c_bf16: the fp32 result rounded to nearest even, as torch's .to(torch.bfloat16)) where the next layer
// rounds its input to bf16 anyway.
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
  int cin;                 // elements per input row = rows per weight panel
  const void* const* a;    // [taps * mr] input rows (float or bf16)
  const void* const* b;    // [taps] weight panels: cin x nr floats, row-major, or bf16 pairs (see above)
  const float* bias;       // nr floats, or nullptr for none
  void* const* c;          // [mr] output rows (float, or bf16 bits if c_bf16); the first n_valid of each written
  int n_valid;             // 1..nr
  int act;                 // Act
  float slope;             // kLeakyRelu's negative slope
  bool c_bf16;             // c holds bf16
};
using TileFn = void (*)(const TileArgs&);
using ActFn = void (*)(float* x, int64_t n, int act, float slope);  // x[0:n] = act(x[0:n]) in place

struct Isa {
  const char* name;
  int lanes;                                       // floats per vector register
  int rows[kMaxVectors + 1];                       // mr of the tile kernel with nv vectors per row
  TileFn tile[kMaxVectors + 1][kMaxRows + 1];      // [nv][mr], mr in 1..rows[nv]
  TileFn tile_bf16[kMaxVectors + 1][kMaxRows + 1];  // the same for bf16 inputs and weights
  ActFn act;
};

extern const Isa kAvx512;
extern const Isa kAvx512Bf16;  // kAvx512 with native bf16 tiles (vdpbf16ps), for CPUs with AVX512-BF16
extern const Isa kAvx2;

}  // namespace aigc_rt::cpu::conv
