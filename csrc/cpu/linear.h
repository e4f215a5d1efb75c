// Internal interface between the linear host code (linear.cpp) and its per-ISA micro-kernels
// (linear_avx512.cpp, linear_avx2.cpp; the portable C++ one is in linear.cpp).
//
// Packed weight layout (made once at load by PackedLinear): panels of 16 output rows. Within a panel the
// weights are stored k-group by k-group, each group holding G consecutive k of all 16 rows:
//   packed[panel][k / G][row % 16][k % G],   G = 1 (fp32, fp16), 2 (bf16 pairs), 4 (int8 quads)
// Rows past `out` and k past `in` are zero (int8: stored as q + 128, so 128); K is padded to a multiple of
// kBf16Chunk (bf16) or kInt8Block (int8), so a panel is a whole number of AMX B tiles.
// int4 (one scale per row and block of kInt8Block inputs) packs each block of a panel into kInt4BlockBytes: 8
// vectors of 16 rows x 4 nibble pairs, then the block's 16 fp32 row scales,
//   packed[panel][block][i][row % 16][j] = u(row, 64 block + 4 i + j) | u(row, 64 block + 4 (i + 8) + j) << 4
// for i < 8, j < 4, u = q + 8 (8 past `in` and `out`), so that one 64-byte load unpacks (& 0xf, >> 4) into the
// int8 layout's quad groups i and i + 8 of the block; the scales (0 past `out`) follow at byte 512 of the block.
// A micro-kernel broadcasts one activation group and multiplies it into a whole panel (one vector of 16 outputs):
// no horizontal sums, and each thread streams a contiguous run of panels.
//
// A micro-kernel computes, for one thread's share, raw sums for rows n in [n0, n1) and panels [p0, p1):
//   y[n, o] = sum_k xp[n, k] * wp[o, k]      (o < out; xp, wp as prepared below)
// (int4: already scaled per block) and linear.cpp applies the epilogue (int8 shift and scale, bias, GELU) while
// those rows are in cache.
#pragma once
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <utility>

namespace aigc_rt::cpu::linear_detail {

constexpr int64_t kPanel = 16;     // output rows per panel
constexpr int64_t kInt8Block = 64; // int8: activations quantised per block of this many inputs; K padded to it
constexpr int64_t kBf16Chunk = 32; // bf16: K padded to a multiple of this (one 64-byte AMX tile row)
constexpr int64_t kInt4Nibbles = kInt8Block / 2 * kPanel;          // int4: a panel block's weight bytes
constexpr int64_t kInt4BlockBytes = kInt4Nibbles + kPanel * 4;     // ... and its 16 fp32 scales after them
constexpr int64_t kInt4Lines = kInt4BlockBytes / (kPanel * 4);     // ... as 64-byte lines (Problem::groups' unit)

enum class WeightType { f32, bf16, int8, int4, f16 };

// Activations prepared once per call (linear.cpp prepare_row):
//   fp32 weights:            xf = x
//   bf16 weights, avx512:    xg = bf16(x) as 32-bit pairs (k, k+1), zero-padded      (vdpbf16ps, AMX)
//   bf16 weights, else:      xf = float(bf16(x))                                      (the same math in fp32)
//   fp16 weights:            xf = float(fp16(x))         (IEEE half, as torch's x.half(); widened weights, fp32 FMAs)
//   int8 weights, avx2+:     xg = int8 quads of xq = round(x / sx[b]) per block b of kInt8Block inputs
//                            (VNNI, AMX, AVX2's vpmaddubsw)
//   int8 weights, scalar:    xf = xq * sx[b]                                          (the same, dequantised)
//   int4 weights:            xg as for int8 (every ISA), and offset[b] = 8 * sum of the block's xq
// int8 weights are stored as u = q + 128, so the int8 kernels sum u * xd (xd = xq * sx, the dequantised
// activations) and the epilogue subtracts shift = 128 * sum_k xd[k] before applying the weight scale; the
// AVX2 and avx512f kernels sum q * xd (see linear_avx2.cpp) and get no shift. int4 weights are stored as u = q + 8 and
// scaled per block inside the kernels, so each block's integer sum is corrected there:
//   y[n, o] = sum_b float(sum_{k in b} u[o, k] xq[n, k] - offset[n, b]) * (ws[o, b] * sx[n, b])
// (fused multiply-adds over b in order, the same in every kernel: the ISAs agree bit for bit).
struct PreparedX {
  const float* xf = nullptr;
  const uint32_t* xg = nullptr;
  const float* sx = nullptr;  // (N, blocks)
  const int32_t* offset = nullptr;  // (N, blocks), int4 only
  int64_t ld = 0;             // row stride of xf (floats) or xg (32-bit groups)
  int64_t blocks = 0;         // int8: K_pad / kInt8Block
};

struct Problem {
  PreparedX x;
  const void* w;   // packed weight
  int64_t groups;  // k-groups per panel (K_pad / G): a panel is groups * 16 * G elements
  int64_t K;       // true input features
  int64_t O;       // true output features
  float* y;        // (N, ldy)
  int64_t ldy;
  // set by run_tiles for one tile: the panels the next tiles will stream (R of them from here, `stride` bytes apart),
  // for the tile to ask L2 for while it computes from cache (nullptr: none)
  const std::byte* l2_next = nullptr;
};

// What an int8 tile starting at activation row n and panel `panel` reads: its packed weight bytes (u = q + 128
// in 16 x 4 quads, `stride` bytes per panel), the rows' activation quads (row stride x.ld) and block scales
// (row stride x.blocks).
struct Int8Operands {
  int64_t stride;
  const uint8_t* w;
  const uint32_t* x;
  const float* sx;
  Int8Operands(const Problem& p, int64_t n, int64_t panel)
      : stride(p.groups * kPanel * 4),
        w(static_cast<const uint8_t*>(p.w) + panel * stride),
        x(p.x.xg + n * p.x.ld),
        sx(p.x.sx + n * p.x.blocks) {}
};

// What an int4 tile reads: an int8 tile's operands (the packed bytes, `stride` per panel: p.groups counts a panel's
// 64-byte lines, kInt4Lines per block, as run_tiles' prefetch expects; see the layout above) and the
// rows' block offsets (row stride x.blocks).
struct Int4Operands {
  int64_t stride;
  const uint8_t* w;
  const uint32_t* x;
  const float* sx;
  const int32_t* offset;
  Int4Operands(const Problem& p, int64_t n, int64_t panel)
      : Int4Operands(Int8Operands(p, n, panel), p.x.offset + n * p.x.blocks) {}

 private:
  Int4Operands(const Int8Operands& o, const int32_t* offset)
      : stride(o.stride), w(o.w), x(o.x), sx(o.sx), offset(offset) {}
};

using MicroKernel = void (*)(const Problem&, int64_t n0, int64_t n1, int64_t p0, int64_t p1);

// linear.cpp's quantize_block for one full block of kInt8Block activations, bit for bit, in AVX-512 (the scalar
// loop cost ~6 us per call at K = 3072, ~4% of a GPT-2 124M int8 decode step).
int32_t quantize_block_avx512(const float* x, int8_t* q, float* s);

// Per ISA: the micro-kernel for each weight type (amx: bf16 and int8 only, and only if amx_available(); avx512f:
// AVX-512 F/BW/VL/DQ without the bf16 and VNNI extensions).
MicroKernel amx_kernel(WeightType t);
MicroKernel avx512_kernel(WeightType t);
MicroKernel avx512f_kernel(WeightType t);
MicroKernel avx2_kernel(WeightType t);
bool amx_available();  // the CPU has AMX and the OS let this process use it

// The loop every micro-kernel shares: register tiles of R panels x up to Tiles::kM activation rows. The
// tile height R is chosen once per call from the first tile's row count (Tiles::panels(M): as many panels
// as the registers hold for that many rows), panels outermost, so each panel is streamed from memory once
// per call and re-read from L1/L2 for further row tiles. Tiles::tile<R, M>(p, n, panel) computes one tile.
template <class Tiles>
void run_tiles(const Problem& p, int64_t n0, int64_t n1, int64_t p0, int64_t p1) {
  using TileFn = void (*)(const Problem&, int64_t, int64_t);
  constexpr int R = Tiles::kR, M = Tiles::kM;
  constexpr auto table = []<int... Rs>(std::integer_sequence<int, Rs...>) {
    constexpr auto row = []<int Rr, int... Ms>(std::integer_sequence<int, Ms...>) {
      return std::array<TileFn, M>{&Tiles::template tile<Rr, Ms + 1>...};
    };
    return std::array<std::array<TileFn, M>, R>{row.template operator()<Rs + 1>(std::make_integer_sequence<int, M>{})...};
  }(std::make_integer_sequence<int, R>{});
  const int64_t height = Tiles::panels(std::min<int64_t>(M, n1 - n0));
  // L2 prefetch of the next panel group (Problem::l2_next), so that memory keeps streaming weights while the cores
  // compute: with several row tiles per group (prefill) the first streams the group from memory and the others re-read
  // it from cache, so the second asks L2 for the next group; with one tile of 2-8 rows (batched decode) that tile does,
  // as it streams its own. A lone row asks for nothing (its stream is the hardware prefetchers'). Measured on the
  // 2-core EPYC (Zen 5), GPT-2 124M's 48 matrices in turns with and without: fp32 / bf16 / int8 at 2 rows 1.00 /
  // 1.02 / 1.08x, 8 rows 1.05 / 1.05 / 1.11x, 16 rows 1.08 / 1.12 / 1.07x, 32 rows 1.04 / 1.08 / 1.06x.
  const bool one_tile = n1 - n0 <= M;
  Problem q = p;
  for (int64_t panel = p0; panel < p1; panel += height) {
    const int64_t r = std::min<int64_t>(height, p1 - panel);
    const std::byte* next = panel + height < p1
                                ? static_cast<const std::byte*>(p.w) + (panel + height) * p.groups * kPanel * 4
                                : nullptr;  // a panel holds groups x 16 lanes x 4 bytes whatever the weight type
    for (int64_t n = n0; n < n1; n += M) {
      q.l2_next = (one_tile ? n1 - n0 > 1 : n == n0 + M) ? next : nullptr;
      table[r - 1][std::min<int64_t>(M, n1 - n) - 1](q, n, panel);
    }
  }
}

}  // namespace aigc_rt::cpu::linear_detail
