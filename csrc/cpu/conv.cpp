// Convolutions with fused bias + activation (fp32), the cpu backend's conv2d and conv_transpose:
//
//   conv2d:          out[n, co, oy, ox] = act(bias[co] + sum over ci, ky, kx of x[n, ci, oy*s - p + ky, ox*s - p + kx]
//                                                                             * w[co, ci, ky, kx])   (0 outside x)
//                    H_out = (H + 2p - k) / s + 1 (likewise W_out)
//   conv_transpose:  out[n, co, oy, ox] = act(bias[co] + sum over ci, ky, kx, iy, ix with oy = iy*s - p + ky,
//                                             ox = ix*s - p + kx of x[n, ci, iy, ix] * w[ci, co, ky, kx])
//                    H_out = (H - 1) * s - 2p + k + output_padding (likewise W_out)
//   act: none, relu, tanh, leaky_relu (negative slope `slope`) or sigmoid.
//
// Both are implicit GEMMs over taps: output pixels (rows) x output channels (columns), each tap (ky, kx) that reads
// inside the image adding the input pixel it reads (C_in floats) times its weight panel (C_in x C_out), done by
// register-blocked tiles (conv_tile.h) of pixels that read through the same taps, OpenMP over tiles. One dimension's
// outputs come in phases (Phase1D): output coordinate first + step * q reads input coordinate q * in_step + d[t]
// through kernel offset k[t].
// conv2d has one phase per dimension: step 1, in_step s, every tap, d = ky - p. With few input channels (an
// image: C_in < one vector, where a tap's C_in multiply-adds would not pay for its setup) the taps' inputs are
// gathered first (im2col: rows of k*k*C_in floats, zeros outside the image), then multiplied as one tap.
// conv_transpose uses the sub-pixel decomposition: output row oy only gets the taps ky with (oy + p - ky) % s == 0,
// from input row iy = (oy + p - ky) / s. So the outputs split into s x s phases (oy % s, ox % s) and each phase is
// a dense convolution: out[n, py + s*qy, px + s*qx, :] = sum over the phase's taps of x[n, qy + dy, qx + dx, :] @ W_tap
// with dy = (py + p - ky) / s (in_step 1): no work on inserted zeros. A 1x1 input (a generator's first layer) is a
// plain GEMM: with one input pixel the stride is irrelevant, so that dimension is split with stride k instead:
// k x k phases of one tap each, z @ W[:, :, ky, kx].
// A transposed convolution with few output channels (C_out < one vector, e.g. the RGB layer): a GEMM of the input
// pixels with all k*k*C_out (tap, channel) columns into P, then col2im: out[n, oy, ox, :] = act(bias + the P
// entries landing there).
//
// Weights are repacked once (conv2d_prepare, conv_transpose_prepare) into panels of nr = lanes * nv output columns:
//   by tap (and im2col) [ceil(C_out / nr) blocks][k*k taps][C_in][nr], i.e. a block's rows (ky*k + kx)*C_in + ci;
//   col2im [ceil(k*k*C_out / nr) blocks][C_in][nr] (column (ky*k + kx)*C_out + co).
// A conv2d's taps (ky, 0..k-1) read k consecutive input pixels, k*C_in consecutive inputs (NHWC), and their
// panels are consecutive too: where a tile's pixels have every x tap inside the image, the k taps of a row ky are
// one tap of k*C_in inputs (fewer, longer runs of the micro-kernel's loop).
// Activations are channels_last (NHWC in memory, logical (N, C, H, W)), except a col2im layer's output, an image,
// which is NCHW. Output buffers are recycled between calls (`recycled`), col2im's P is per-thread scratch.
// References: torch.nn.functional.conv2d, conv_transpose2d. Tests: tests/test_cpu_conv.py.
#include <c10/util/strides.h>
#include <omp.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "common.h"
#include "cpu/conv_isa.h"
#include "cpu/ops.h"
#include "cpu/scratch.h"
#include "cpu/vec.h"

namespace aigc_rt::cpu {
namespace {

using conv::Isa;
using conv::TileArgs;
constexpr int64_t kMaxKernel = 16;

// The tile kernels for an ISA name. "auto" follows the extension's one ISA switch (vec.h: active_isa(), set by
// _C.set_simd_isa), and for bf16 weights takes the native bf16 tiles where the CPU has AVX512-BF16; there are no
// scalar tiles, so below AVX2 it is a ValueError. AVX-512 tiles also need BW. "avx512" and "avx2" run bf16
// weights on emulated bf16 tiles (the same sums, two FMAs a pair).
const Isa& isa_named(const std::string& name, const char* op, bool bf16 = false) {
  static const bool avx512 = detected_isa() == cpu::Isa::avx512 && __builtin_cpu_supports("avx512bw");
  static const bool avx512_bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  static const bool avx2 = detected_isa() >= cpu::Isa::avx2;
  AIGC_CHECK(name == "auto" || name == "avx512_bf16" || name == "avx512" || name == "avx2", op, ": unknown isa '",
             name, "' (expected auto, avx512_bf16, avx512 or avx2)");
  const cpu::Isa active = active_isa();
  AIGC_CHECK(name != "auto" || active != cpu::Isa::scalar,
             op, ": no scalar kernel; the active ISA (_C.set_simd_isa) must be avx2 or avx512");
  if (name == "avx512_bf16" || (name == "auto" && bf16 && active == cpu::Isa::avx512 && avx512_bf16)) {
    AIGC_CHECK(avx512_bf16, op, ": this CPU lacks AVX512-BF16");
    return conv::kAvx512Bf16;
  }
  if (name == "avx512" || (name == "auto" && active == cpu::Isa::avx512 && avx512)) {
    AIGC_CHECK(avx512, op, ": this CPU lacks AVX-512 (F, DQ, VL, BW)");
    return conv::kAvx512;
  }
  AIGC_CHECK(avx2, op, ": this CPU lacks AVX2 + FMA");
  return conv::kAvx2;
}

int act_code(const std::string& act, const char* op) {
  if (act == "none") return conv::kNone;
  if (act == "relu") return conv::kRelu;
  if (act == "tanh") return conv::kTanh;
  if (act == "leaky_relu") return conv::kLeakyRelu;
  if (act == "sigmoid") return conv::kSigmoid;
  AIGC_CHECK(false, op, ": unknown activation '", act, "' (expected none, relu, tanh, leaky_relu or sigmoid)");
  return 0;
}

// Vectors per panel row for `columns` output columns: the fewest padded vectors, counting narrow tiles
// (which do fewer multiply-adds per load) as slower.
int64_t choose_nv(int64_t columns, int lanes) {
  static const double speed[conv::kMaxVectors + 1] = {0, 0.6, 0.9, 0.95, 1.0};
  const int64_t vectors = (columns + lanes - 1) / lanes;
  int64_t best = 1;
  double best_cost = 1e300;
  for (int64_t nv = conv::kMaxVectors; nv >= 1; --nv) {
    const double cost = (double)((vectors + nv - 1) / nv * nv) / speed[nv];
    if (cost < best_cost) best = nv, best_cost = cost;
  }
  return best;
}

// The output coordinates of one dimension split into phases: first + step * q for q < count, each fed by
// ntaps kernel offsets k[t] from input coordinate q * in_step + d[t].
struct Phase1D {
  int64_t first, step, count, in_step;
  int ntaps;
  int64_t k[kMaxKernel], d[kMaxKernel];
};

// conv2d: one phase, every output coordinate reads input oy * s - p + ky through offset ky.
Phase1D phase_conv2d(int64_t out, int64_t k, int64_t s, int64_t p) {
  Phase1D ph{0, 1, out, s, (int)k, {}, {}};
  for (int64_t ky = 0; ky < k; ++ky) ph.k[ky] = ky, ph.d[ky] = ky - p;
  return ph;
}

// conv_transpose: the sub-pixel phases (see the header).
std::vector<Phase1D> phases_transposed(int64_t in, int64_t out, int64_t k, int64_t s, int64_t p) {
  const int64_t step = in == 1 ? k : s;  // one input pixel: the stride does not matter (see the header)
  std::vector<Phase1D> phases;
  for (int64_t first = 0; first < step && first < out; ++first) {
    Phase1D ph{first, step, (out - first + step - 1) / step, 1, 0, {}, {}};
    for (int64_t ky = 0; ky < k; ++ky) {
      const int64_t num = first + p - ky;
      if (num % step == 0) ph.k[ph.ntaps] = ky, ph.d[ph.ntaps++] = num / step;
    }
    phases.push_back(ph);
  }
  return phases;
}

// The coordinates q < ph.count grouped by which of the phase's taps read inside [0, size): one list of q per
// distinct set, in order of first appearance.
std::vector<std::vector<int64_t>> tap_classes(const Phase1D& ph, int64_t size) {
  std::vector<uint32_t> masks;
  std::vector<std::vector<int64_t>> classes;
  for (int64_t q = 0; q < ph.count; ++q) {
    uint32_t mask = 0;
    for (int t = 0; t < ph.ntaps; ++t) {
      const int64_t i = q * ph.in_step + ph.d[t];
      mask |= (uint32_t)(i >= 0 && i < size) << t;
    }
    const size_t c = std::find(masks.begin(), masks.end(), mask) - masks.begin();
    if (c == masks.size()) masks.push_back(mask), classes.emplace_back();
    classes[c].push_back(q);
  }
  return classes;
}

// Splits [0, len) into ceil(len / max_rows) runs of near-equal size: (start, rows) pairs appended to `runs`.
void split_rows(int64_t base, int64_t len, int max_rows, std::vector<std::pair<int64_t, int>>& runs) {
  const int64_t pieces = (len + max_rows - 1) / max_rows;
  for (int64_t i = 0, start = 0; i < pieces; ++i) {
    const int rows = (int)(len / pieces + (i < len % pieces));
    runs.emplace_back(base + start, rows);
    start += rows;
  }
}

struct Geometry {
  int64_t n, cin, h, w, ho, wo;
};

// Panel `index` of the packed weights, each panel `rows` x nr: floats, or for bf16 weights ceil(rows / 2) x nr
// pairs (conv_isa.h).
const void* panel(const ConvWeights& wt, int64_t index, int64_t rows, int64_t nr) {
  if (!wt.bf16) return wt.packed.data_ptr<float>() + index * rows * nr;
  return static_cast<const uint16_t*>(wt.packed.data_ptr()) + index * ((rows + 1) / 2 * 2) * nr;
}

// Element i of an output of fp32 or (bf16) 16-bit values.
void* element(void* out, int64_t i, bool bf16) {
  return bf16 ? static_cast<void*>(static_cast<uint16_t*>(out) + i) : static_cast<void*>(static_cast<float*>(out) + i);
}

// The tile kernel for `rows` rows of these weights' panel width and element type.
conv::TileFn tile_fn(const Isa& isa, const ConvWeights& wt, int rows) {
  return wt.bf16 ? isa.tile_bf16[wt.nv][rows] : isa.tile[wt.nv][rows];
}

// The implicit GEMMs of the phases ph_y x ph_x, with the by-tap weight panels.
// TA: the input's element type, float or (bf16 weights) uint16_t holding bf16.
template <class TA>
void run_taps(const TA* x, void* out, bool out_bf16, const Geometry& g, const ConvWeights& wt, const Isa& isa, int act,
              float slope, const std::vector<Phase1D>& ph_y, const std::vector<Phase1D>& ph_x) {
  const int64_t k = wt.kernel, cout = wt.cout, nr = wt.nv * isa.lanes, blocks = (cout + nr - 1) / nr;
  const int mr = isa.rows[wt.nv];
  // Tiles of <= mr output pixels of one phase and one class. A pixel's class says which taps read inside the image:
  // the set of y taps valid at its qy and of x taps valid at its qx. A class's pixels, (n, qy, qx) in order, are cut
  // into runs of <= mr, so a tile runs only taps valid for all its rows (no multiply-adds of zeros) and, the classes
  // spanning rows and images, is full whatever the output width (cutting per output row made an 8-wide row two
  // 4-row tiles and multiplied zeros at its ends). Only a small class (a corner) makes a short tile.
  struct Tile {
    const Phase1D *y, *x;
    size_t p0;  // first of its pixels in `pixels`
    int rows;
  };
  std::vector<Tile> tiles;
  struct Pixel {  // 12 bytes: a batch of 1,024 64x64 images lists 4M of them
    int32_t n, qy, qx;
  };
  std::vector<Pixel> pixels;  // phase by phase, class by class
  std::vector<std::pair<int64_t, int>> runs;
  std::vector<std::pair<size_t, size_t>> phase_tiles;  // [begin, end) in `tiles` of each phase
  for (const auto& py : ph_y)
    for (const auto& px : ph_x) {
      runs.clear();
      const auto y_classes = tap_classes(py, g.h), x_classes = tap_classes(px, g.w);
      for (const auto& cy : y_classes)
        for (const auto& cx : x_classes) {
          const int64_t begin = (int64_t)pixels.size();
          for (int64_t n = 0; n < g.n; ++n)
            for (int64_t qy : cy)
              for (int64_t qx : cx) pixels.push_back({(int32_t)n, (int32_t)qy, (int32_t)qx});
          split_rows(begin, (int64_t)pixels.size() - begin, mr, runs);
        }
      phase_tiles.emplace_back(tiles.size(), tiles.size() + runs.size());
      for (auto [start, rows] : runs) tiles.push_back({&py, &px, (size_t)start, rows});
    }
  // Work items: (a run of <= kTilesPerItem tiles of one phase, one block of nr output channels). A thread
  // works through consecutive items, so the block's weight panels (taps x C_in x nr) stay in its L2 cache
  // while the tiles stream past them.
  constexpr size_t kTilesPerItem = 16;
  struct Item {
    size_t tile0, tile1;
    int64_t block;
  };
  std::vector<Item> items;
  for (auto [begin, end] : phase_tiles)
    for (int64_t j = 0; j < blocks; ++j)
      for (size_t t = begin; t < end; t += kTilesPerItem) items.push_back({t, std::min(end, t + kTilesPerItem), j});
  // conv2d's x taps merge where their panels' pair rows do not straddle taps (bf16: C_in even)
  const int64_t s = wt.stride, p = wt.padding;
  const bool merge_x = !wt.transposed && k > 1 && !(wt.bf16 && g.cin % 2);
  const float* bias = wt.bias.data_ptr<float>();
  const int64_t max_taps = k * k;
#pragma omp parallel if (items.size() > 1)
  {
    std::vector<const void*> a(max_taps * mr), b(max_taps);
    void* c[conv::kMaxRows];
#pragma omp for schedule(static)
    for (size_t it = 0; it < items.size(); ++it) {
      const int64_t j = items[it].block;
      for (size_t ti = items[it].tile0; ti < items[it].tile1; ++ti) {
        const Tile& tile = tiles[ti];
        const Phase1D &py = *tile.y, &px = *tile.x;
        const int rows = tile.rows;
        const Pixel* pix = pixels.data() + tile.p0;  // the tile's rows
        for (int r = 0; r < rows; ++r) {
          const int64_t oy = py.first + py.step * pix[r].qy, ox = px.first + px.step * pix[r].qx;
          c[r] = element(out, ((pix[r].n * g.ho + oy) * g.wo + ox) * cout + j * nr, out_bf16);
        }
        // The rows are of one class: each tap reads inside the image for all of them or for none (row 0 says).
        // conv2d with every x tap inside: the x taps as one (see the header), else one by one.
        const bool merge = merge_x && pix[0].qx * s - p >= 0 && pix[0].qx * s - p + k <= g.w;
        const int x_taps = merge ? (int)k : 1;
        int taps = 0;  // the taps that read inside the image
        for (int ty = 0; ty < py.ntaps; ++ty)
          for (int tx = 0; tx < px.ntaps; tx += x_taps) {
            const int64_t iy0 = pix[0].qy * py.in_step + py.d[ty], ix0 = pix[0].qx * px.in_step + px.d[tx];
            if (iy0 < 0 || iy0 >= g.h || ix0 < 0 || ix0 >= g.w) continue;
            for (int r = 0; r < rows; ++r) {
              const int64_t iy = pix[r].qy * py.in_step + py.d[ty], ix = pix[r].qx * px.in_step + px.d[tx];
              a[taps * rows + r] = x + ((pix[r].n * g.h + iy) * g.w + ix) * g.cin;
            }
            b[taps++] = panel(wt, j * k * k + py.k[ty] * k + px.k[tx], g.cin, nr);
          }
        const TileArgs args{taps, (int)(g.cin * x_taps), a.data(), b.data(), bias + j * nr, c,
                            (int)std::min(nr, cout - j * nr), act, slope, out_bf16};
        tile_fn(isa, wt, rows)(args);
      }
    }
  }
}

// conv2d with few input channels: each output pixel's k*k*C_in inputs gathered into one row (zeros outside the
// image), then the GEMM of those rows with the panels, bias and act fused. A thread gathers the rows of one tile
// at a time into its own buffer, so they never leave its L1/L2 cache.
template <class TA>
void run_im2col(const TA* x, void* out, bool out_bf16, const Geometry& g, const ConvWeights& wt, const Isa& isa,
                int act, float slope) {
  const int64_t k = wt.kernel, s = wt.stride, p = wt.padding, cin = g.cin, cout = wt.cout, row_len = k * k * cin;
  const int64_t nr = wt.nv * isa.lanes, blocks = (cout + nr - 1) / nr;
  std::vector<std::pair<int64_t, int>> runs;
  split_rows(0, g.n * g.ho * g.wo, isa.rows[wt.nv], runs);
  const float* bias = wt.bias.data_ptr<float>();
#pragma omp parallel if (runs.size() > 1)
  {
    std::vector<TA> patches(conv::kMaxRows * row_len);
    const void* a[conv::kMaxRows];
    void* c[conv::kMaxRows];
#pragma omp for schedule(static)
    for (size_t it = 0; it < runs.size(); ++it) {
      const auto [m0, rows] = runs[it];
      for (int r = 0; r < rows; ++r) {
        const int64_t m = m0 + r, ox = m % g.wo, oy = (m / g.wo) % g.ho, n = m / (g.wo * g.ho);
        const int64_t ix0 = ox * s - p;
        TA* dst = patches.data() + r * row_len;
        a[r] = dst;
        for (int64_t ky = 0; ky < k; ++ky, dst += k * cin) {  // the k taps (ky, 0..k-1)
          const int64_t iy = oy * s - p + ky;
          const TA* x_row = x + (n * g.h + iy) * g.w * cin;  // (W, C_in), when 0 <= iy < H
          if (iy < 0 || iy >= g.h) {
            std::fill(dst, dst + k * cin, TA(0));
          } else if (ix0 >= 0 && ix0 + k <= g.w) {
            std::copy_n(x_row + ix0 * cin, k * cin, dst);  // inside the image: one contiguous run
          } else {
            for (int64_t kx = 0; kx < k; ++kx) {
              const int64_t ix = ix0 + kx;
              if (ix < 0 || ix >= g.w)
                std::fill(dst + kx * cin, dst + (kx + 1) * cin, TA(0));
              else
                std::copy_n(x_row + ix * cin, cin, dst + kx * cin);
            }
          }
        }
      }
      for (int64_t j = 0; j < blocks; ++j) {
        const void* b = panel(wt, j, row_len, nr);
        for (int r = 0; r < rows; ++r) c[r] = element(out, (m0 + r) * cout + j * nr, out_bf16);
        const TileArgs args{1, (int)row_len, a, &b, bias + j * nr, c, (int)std::min(nr, cout - j * nr), act, slope,
                            out_bf16};
        tile_fn(isa, wt, rows)(args);
      }
    }
  }
}

// One tap's part of a col2im output row: dst[i * s * C + c] += src[i * ldp + c] for i < count, c < C; the
// channel loop unrolled for an image's 1-4 channels.
template <int C>
void add_tap_fixed(float* dst, const float* src, int64_t count, int64_t s, int64_t ldp) {
  for (int64_t i = 0; i < count; ++i, dst += s * C, src += ldp)
    for (int c = 0; c < C; ++c) dst[c] += src[c];
}

void add_tap(float* dst, const float* src, int64_t count, int64_t s, int64_t ldp, int64_t channels) {
  switch (channels) {
    case 1: return add_tap_fixed<1>(dst, src, count, s, ldp);
    case 2: return add_tap_fixed<2>(dst, src, count, s, ldp);
    case 3: return add_tap_fixed<3>(dst, src, count, s, ldp);
    case 4: return add_tap_fixed<4>(dst, src, count, s, ldp);
  }
  for (int64_t i = 0; i < count; ++i, dst += s * channels, src += ldp)
    for (int64_t c = 0; c < channels; ++c) dst[c] += src[c];
}

// floor(a / b) and ceil(a / b) for b > 0 and any a
int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

// The col2im path in bands of output rows: a thread takes (image, band) items, multiplies the input rows the band
// reads into its own scratch P (kept in its L2 cache: the whole batch's P made a round trip through memory), then
// adds P's entries into the band's output rows. Bands split an image only to give every thread work (batch 1) or
// to keep P under ~256 KiB; an input row two bands read is multiplied by both.
template <class TA>
void run_col2im(const TA* x, void* out, bool out_bf16, const Geometry& g, const ConvWeights& wt, const Isa& isa,
                int act, float slope) {
  const int64_t k = wt.kernel, s = wt.stride, p = wt.padding, cout = wt.cout;
  const int64_t nr = wt.nv * isa.lanes, blocks = (k * k * cout + nr - 1) / nr, ldp = blocks * nr;
  const int mr = isa.rows[wt.nv];
  const int64_t threads = omp_get_max_threads(), row_bytes = g.w * ldp * (int64_t)sizeof(float);
  const int64_t bands = std::min(g.ho, std::max((threads + g.n - 1) / g.n,
                                                ceil_div(g.h * row_bytes, int64_t{256} << 10)));
  const int64_t max_rows = std::min(g.h, ceil_div(ceil_div(g.ho, bands) + k - 1, s) + 1);  // input rows a band reads
  const float* bias = wt.bias.data_ptr<float>();
#pragma omp parallel if (g.n * bands > 1)
  {
    float* cols = thread_scratch(ScratchSlot::worker, max_rows * g.w * ldp);  // P: band pixels x k*k*C_out (ldp)
    std::vector<float> o(g.wo * cout);  // one output row (W_out, C_out), then written to the NCHW planes
    std::vector<std::pair<int64_t, int>> runs;
    const void* a[conv::kMaxRows];
    void* c[conv::kMaxRows];
#pragma omp for schedule(static)
    for (int64_t item = 0; item < g.n * bands; ++item) {
      const int64_t n = item / bands, band = item % bands;
      const int64_t oy0 = band * g.ho / bands, oy1 = (band + 1) * g.ho / bands;
      // input rows iy with oy = iy*s - p + ky in [oy0, oy1) for some tap ky < k
      const int64_t iy0 = std::max<int64_t>(0, ceil_div(oy0 + p - (k - 1), s));
      const int64_t iy1 = std::min<int64_t>(g.h, floor_div(oy1 - 1 + p, s) + 1);
      runs.clear();
      if (iy1 > iy0) split_rows(0, (iy1 - iy0) * g.w, mr, runs);
      for (auto [m0, rows] : runs) {
        for (int r = 0; r < rows; ++r) a[r] = x + ((n * g.h + iy0) * g.w + m0 + r) * g.cin;
        for (int64_t j = 0; j < blocks; ++j) {
          const void* b = panel(wt, j, g.cin, nr);
          for (int r = 0; r < rows; ++r) c[r] = cols + (m0 + r) * ldp + j * nr;
          const TileArgs args{1, (int)g.cin, a, &b, nullptr, c, (int)nr, conv::kNone, 0.f, false};
          tile_fn(isa, wt, rows)(args);
        }
      }
      // col2im: output (oy, ox) gets tap (ky, kx) of input (iy, ix) where oy = iy*s - p + ky, ox = ix*s - p + kx
      for (int64_t oy = oy0; oy < oy1; ++oy) {
        for (int64_t ox = 0; ox < g.wo; ++ox)
          for (int64_t co = 0; co < cout; ++co) o[ox * cout + co] = bias[co];
        for (int64_t ky = (oy + p) % s; ky < k; ky += s) {
          const int64_t iy = (oy + p - ky) / s;
          if (iy < iy0 || iy >= iy1) continue;  // outside the image (the band's rows are all it reads)
          const float* p_row = cols + (iy - iy0) * g.w * ldp;  // (W, ldp)
          for (int64_t kx = 0; kx < k; ++kx) {
            // inputs ix with 0 <= ox = ix*s - p + kx < W_out
            const int64_t ix0 = std::max<int64_t>(0, (p - kx + s - 1) / s);
            const int64_t last = g.wo - 1 + p - kx;  // ix * s <= last
            const int64_t ix1 = std::min<int64_t>(g.w, last < 0 ? 0 : last / s + 1);
            if (ix1 > ix0)
              add_tap(o.data() + (ix0 * s - p + kx) * cout, p_row + ix0 * ldp + (ky * k + kx) * cout, ix1 - ix0, s,
                      ldp, cout);
          }
        }
        isa.act(o.data(), g.wo * cout, act, slope);
        for (int64_t co = 0; co < cout; ++co) {
          const int64_t plane_row = ((n * cout + co) * g.ho + oy) * g.wo;
          for (int64_t ox = 0; ox < g.wo; ++ox) {
            if (out_bf16)
              static_cast<uint16_t*>(out)[plane_row + ox] = to_bf16(o[ox * cout + co]);
            else
              static_cast<float*>(out)[plane_row + ox] = o[ox * cout + co];
          }
        }
      }
    }
  }
}

// A tensor of this shape, format and dtype on the storage `cache` if that has exactly its size and no one else
// holds it (a returned tensor or a view of it), else on a new storage that becomes the cache: a layer's output
// buffer is recycled once the caller has dropped the previous one, so a steady stream of same-size batches allocates
// nothing (fresh large allocations cost a page fault per 4 KiB). Only the storage is cached, never a tensor:
// the returned tensor is the caller's alone (torch keeps a Python tensor's C++ half alive while C++ holds it).
torch::Tensor recycled(c10::Storage& cache, at::IntArrayRef sizes, at::MemoryFormat format,
                       torch::ScalarType dtype = torch::kFloat32) {
  const auto options = torch::dtype(dtype);
  const int64_t itemsize = (int64_t)c10::elementSize(dtype), bytes = c10::multiply_integers(sizes) * itemsize;
  if (!cache || cache.use_count() != 1 || (int64_t)cache.nbytes() != bytes) {
    cache = torch::empty({bytes / itemsize}, options).storage();
  }
  const c10::DimVector strides = format == at::MemoryFormat::ChannelsLast
                                     ? c10::DimVector(c10::get_channels_last_strides_2d(sizes))
                                     : c10::contiguous_strides(sizes);
  return torch::empty({0}, options).set_(cache, 0, sizes, strides);
}

// Checks shared by conv2d_prepare and conv_transpose_prepare; weight is (C_in, C_out, k, k) when transposed,
// else (C_out, C_in, k, k).
void check_prepare(const char* op, const torch::Tensor& weight, const torch::Tensor& bias, int64_t stride,
                   int64_t padding, bool transposed) {
  const char* layout = transposed ? "(C_in, C_out, k, k)" : "(C_out, C_in, k, k)";
  AIGC_CHECK(weight.device().is_cpu() && weight.dim() == 4 &&
                 (weight.scalar_type() == torch::kFloat32 || weight.scalar_type() == torch::kBFloat16),
             op, ": weight must be a float32 or bfloat16 CPU tensor ", layout, ", got ", weight.scalar_type(), " ",
             weight.sizes(), " on ", weight.device());
  const int64_t k = weight.size(2), cout = weight.size(transposed ? 1 : 0);
  AIGC_CHECK(weight.size(3) == k, op, ": kernel must be square, got ", weight.sizes());
  AIGC_CHECK(weight.size(0) >= 1 && weight.size(1) >= 1 && k >= 1 && k <= kMaxKernel, op, ": weight ",
             weight.sizes(), " must have C_in, C_out >= 1 and 1 <= k <= ", kMaxKernel);
  AIGC_CHECK(bias.device().is_cpu() && bias.scalar_type() == torch::kFloat32 && bias.dim() == 1 &&
                 bias.size(0) == cout,
             op, ": bias must be a float32 CPU tensor of ", cout, " elements, got ", bias.scalar_type(), " ",
             bias.sizes());
  AIGC_CHECK(stride >= 1 && padding >= 0, op, ": need stride >= 1 and padding >= 0, got stride ", stride,
             ", padding ", padding);
}

// The weights' geometry, panel width, zero-padded bias and zeroed fp32 panels in the layout its flags say (see
// the header), filled by the caller (then, for bf16 weights, turned into pairs by to_pairs).
ConvWeights new_weights(const torch::Tensor& bias, int64_t cin, int64_t cout, int64_t k, int64_t stride,
                        int64_t padding, bool transposed, bool col2im, bool im2col, bool bf16, const Isa& isa) {
  ConvWeights wt;
  wt.cin = cin, wt.cout = cout, wt.kernel = k, wt.stride = stride, wt.padding = padding, wt.output_padding = 0;
  wt.transposed = transposed, wt.col2im = col2im, wt.im2col = im2col, wt.bf16 = bf16, wt.isa = isa.name;
  const int64_t columns = col2im ? k * k * cout : cout;
  wt.nv = choose_nv(columns, isa.lanes);
  const int64_t nr = wt.nv * isa.lanes, blocks = (columns + nr - 1) / nr;
  const std::vector<int64_t> panels = col2im ? std::vector<int64_t>{blocks, cin, nr}
                                             : std::vector<int64_t>{blocks, k * k, cin, nr};
  wt.packed = torch::zeros(panels, torch::kFloat32);
  wt.bias = torch::zeros({std::max(cout, blocks * nr)}, torch::kFloat32);
  wt.bias.narrow(0, 0, cout).copy_(bias);
  return wt;
}

// fp32 panels (..., rows, nr) -> bf16 pairs (..., ceil(rows / 2), nr, 2): rows 2i and 2i + 1 of a column side by
// side, a zero row after an odd last one (conv_isa.h). Exact for weights that came as bf16.
torch::Tensor to_pairs(const torch::Tensor& panels, int64_t rows) {
  const int64_t nr = panels.size(-1);
  torch::Tensor p = panels.reshape({-1, rows, nr});
  if (rows % 2) p = torch::cat({p, torch::zeros({p.size(0), 1, nr}, p.options())}, 1);
  return p.reshape({p.size(0), (rows + 1) / 2, 2, nr}).transpose(2, 3).contiguous().to(torch::kBFloat16);
}

// x as channels_last float32 (bf16 for bf16 weights: each layer rounds its input) with the weights' channels, and
// its geometry (the output size left to the caller).
std::pair<torch::Tensor, Geometry> input(const char* op, const torch::Tensor& x_in, const ConvWeights& wt,
                                         bool transposed) {
  AIGC_CHECK(wt.transposed == transposed, op, ": the weights were prepared by ",
             wt.transposed ? "conv_transpose_prepare" : "conv2d_prepare");
  AIGC_CHECK(x_in.device().is_cpu() && x_in.is_floating_point() && x_in.dim() == 4, op,
             ": x must be a float32 (or bfloat16) CPU tensor (N, C_in, H, W), got ", x_in.scalar_type(), " ",
             x_in.sizes(), " on ", x_in.device());
  AIGC_CHECK(wt.bf16 || x_in.scalar_type() == torch::kFloat32, op, ": x must be float32 for float32 weights, got ",
             x_in.scalar_type());
  AIGC_CHECK(x_in.size(1) == wt.cin, op, ": x has ", x_in.size(1), " channels, the weights take ", wt.cin);
  AIGC_CHECK(x_in.size(0) < (1ll << 31) && x_in.size(2) < (1 << 24) && x_in.size(3) < (1 << 24), op, ": x ",
             x_in.sizes(), " is too large (batch < 2^31, sides < 2^24)");
  const torch::Tensor dense = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  torch::Tensor x = dense;
  if (wt.bf16 && dense.scalar_type() == torch::kFloat32) {  // rounded in parallel into a recycled buffer (torch's
    x = recycled(wt.in_cache, dense.sizes(), at::MemoryFormat::ChannelsLast, torch::kBFloat16);  // .to(): ~4x slower)
    const float* src = dense.data_ptr<float>();
    uint16_t* dst = static_cast<uint16_t*>(x.data_ptr());
    const int64_t n = x.numel();
#pragma omp parallel for schedule(static) if (n > (1 << 15))
    for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
  } else if (dense.scalar_type() != (wt.bf16 ? torch::kBFloat16 : torch::kFloat32)) {
    x = dense.to(wt.bf16 ? torch::kBFloat16 : torch::kFloat32);
  }
  const Geometry g{x.size(0), wt.cin, x.size(2), x.size(3), 0, 0};
  return {x, g};
}

// x's data as the drivers' element type: float, or the bf16 bits as uint16_t.
template <class TA>
const TA* data(const torch::Tensor& x) {
  return static_cast<const TA*>(x.data_ptr());
}

}  // namespace

ConvWeights conv2d_prepare(const torch::Tensor& weight, const torch::Tensor& bias, int64_t stride, int64_t padding,
                           const std::string& isa_name) {
  check_prepare("conv2d_prepare", weight, bias, stride, padding, false);
  const bool bf16 = weight.scalar_type() == torch::kBFloat16;
  const conv::Isa& isa = isa_named(isa_name, "conv2d_prepare", bf16);
  const int64_t cout = weight.size(0), cin = weight.size(1), k = weight.size(2);
  ConvWeights wt = new_weights(bias, cin, cout, k, stride, padding, false, false, cin < isa.lanes, bf16, isa);
  const int64_t nr = wt.nv * isa.lanes;
  const torch::Tensor weight_c = weight.to(torch::kFloat32).contiguous();
  const auto w = weight_c.accessor<float, 4>();
  float* pk = wt.packed.data_ptr<float>();
  for (int64_t co = 0; co < cout; ++co)
    for (int64_t ci = 0; ci < cin; ++ci)
      for (int64_t tap = 0; tap < k * k; ++tap)
        pk[((co / nr * k * k + tap) * cin + ci) * nr + co % nr] = w[co][ci][tap / k][tap % k];
  if (bf16) wt.packed = to_pairs(wt.packed, wt.im2col ? k * k * cin : cin);
  return wt;
}

ConvWeights conv_transpose_prepare(const torch::Tensor& weight, const torch::Tensor& bias, int64_t stride,
                                   int64_t padding, int64_t output_padding, const std::string& isa_name) {
  check_prepare("conv_transpose_prepare", weight, bias, stride, padding, true);
  AIGC_CHECK(output_padding >= 0 && output_padding < stride,
             "conv_transpose_prepare: need 0 <= output_padding < stride, got output_padding ", output_padding,
             " with stride ", stride);
  const bool bf16 = weight.scalar_type() == torch::kBFloat16;
  const conv::Isa& isa = isa_named(isa_name, "conv_transpose_prepare", bf16);
  const int64_t cin = weight.size(0), cout = weight.size(1), k = weight.size(2);
  ConvWeights wt = new_weights(bias, cin, cout, k, stride, padding, true, cout < isa.lanes, false, bf16, isa);
  wt.output_padding = output_padding;
  const int64_t nr = wt.nv * isa.lanes;
  const torch::Tensor weight_c = weight.to(torch::kFloat32).contiguous();
  const auto w = weight_c.accessor<float, 4>();
  float* pk = wt.packed.data_ptr<float>();
  for (int64_t ci = 0; ci < cin; ++ci)
    for (int64_t co = 0; co < cout; ++co)
      for (int64_t tap = 0; tap < k * k; ++tap) {
        const int64_t col = wt.col2im ? tap * cout + co : co;
        const int64_t panel = wt.col2im ? col / nr : col / nr * k * k + tap;
        pk[(panel * cin + ci) * nr + col % nr] = w[ci][co][tap / k][tap % k];
      }
  if (bf16) wt.packed = to_pairs(wt.packed, cin);
  return wt;
}

torch::Tensor conv2d(const torch::Tensor& x_in, const ConvWeights& wt, const std::string& act_name, double slope,
                     bool out_bf16) {
  const int act = act_code(act_name, "conv2d");
  auto [x, g] = input("conv2d", x_in, wt, false);
  const int64_t k = wt.kernel, s = wt.stride, p = wt.padding;
  AIGC_CHECK(g.h + 2 * p >= k && g.w + 2 * p >= k, "conv2d: input ", x.sizes(), " is smaller than the kernel (", k,
             " x ", k, ") with padding ", p);
  g.ho = (g.h + 2 * p - k) / s + 1;
  g.wo = (g.w + 2 * p - k) / s + 1;
  torch::Tensor out = recycled(wt.out_cache, {g.n, wt.cout, g.ho, g.wo}, at::MemoryFormat::ChannelsLast,
                               out_bf16 ? torch::kBFloat16 : torch::kFloat32);
  if (g.n == 0) return out;
  const conv::Isa& isa = isa_named(wt.isa, "conv2d");
  auto run = [&](auto element) {  // float, or uint16_t for bf16 inputs
    using TA = decltype(element);
    if (wt.im2col)
      run_im2col(data<TA>(x), out.data_ptr(), out_bf16, g, wt, isa, act, (float)slope);
    else
      run_taps(data<TA>(x), out.data_ptr(), out_bf16, g, wt, isa, act, (float)slope, {phase_conv2d(g.ho, k, s, p)},
               {phase_conv2d(g.wo, k, s, p)});
  };
  wt.bf16 ? run(uint16_t{}) : run(float{});
  return out;
}

torch::Tensor conv_transpose(const torch::Tensor& x_in, const ConvWeights& wt, const std::string& act_name,
                             double slope, bool out_bf16) {
  const int act = act_code(act_name, "conv_transpose");
  auto [x, g] = input("conv_transpose", x_in, wt, true);
  g.ho = (g.h - 1) * wt.stride - 2 * wt.padding + wt.kernel + wt.output_padding;
  g.wo = (g.w - 1) * wt.stride - 2 * wt.padding + wt.kernel + wt.output_padding;
  AIGC_CHECK(g.h >= 1 && g.w >= 1 && g.ho >= 1 && g.wo >= 1, "conv_transpose: input ", x.sizes(),
             " gives an empty output (", g.ho, " x ", g.wo, ")");
  // channels_last for the next layer; a col2im layer (few channels: an image) writes plain NCHW
  const auto format = wt.col2im ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  torch::Tensor out = recycled(wt.out_cache, {g.n, wt.cout, g.ho, g.wo}, format,
                               out_bf16 ? torch::kBFloat16 : torch::kFloat32);
  if (g.n == 0) return out;
  const conv::Isa& isa = isa_named(wt.isa, "conv_transpose");
  auto run = [&](auto element) {  // float, or uint16_t for bf16 inputs
    using TA = decltype(element);
    if (wt.col2im) {
      run_col2im(data<TA>(x), out.data_ptr(), out_bf16, g, wt, isa, act, (float)slope);
    } else {
      const int64_t k = wt.kernel, s = wt.stride, p = wt.padding;
      run_taps(data<TA>(x), out.data_ptr(), out_bf16, g, wt, isa, act, (float)slope,
               phases_transposed(g.h, g.ho, k, s, p), phases_transposed(g.w, g.wo, k, s, p));
    }
  };
  wt.bf16 ? run(uint16_t{}) : run(float{});
  return out;
}

}  // namespace aigc_rt::cpu
