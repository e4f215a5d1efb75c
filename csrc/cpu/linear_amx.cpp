// AMX micro-kernels of the linear layer for bf16 and int8 weights (see linear.h for the packed layout and
// the contract). The packed panel layout is exactly AMX's B-tile layout: 16 groups x 16 rows x G values is
// one 1 KiB tile of (16 x 64 bytes) per 32 (bf16) or 64 (int8) inputs of a panel, and a row tile of up to
// 16 prepared activation rows is the A tile. Per row tile of M rows and up to 4 panels:
//   bf16: C[m, 16 outputs] += A[m, 32 k] . B[16 k-pairs, 16 outputs, 2]       (tdpbf16ps, fp32 C)
//   int8: per block of 64 inputs, C = A[m, 64 k] (int8) . B (u8, q + 128)    (tdpbsud, exact int32 C),
//         then acc[m, :] += float(C[m, :]) * sx[m, block]                       (AVX-512)
// Used for row tiles of at least kAmxMinRows; fewer rows go to the AVX-512 kernels (same prepared data).
// Linux only hands out AMX state after arch_prctl(ARCH_REQ_XCOMP_PERM): amx_available() asks once.
// Tests: tests/test_cpu_linear.py (ISA forced to amx).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include "cpu/linear.h"

#define AMX __attribute__((target("amx-tile,amx-bf16,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace aigc_rt::cpu::linear_detail {
namespace {

constexpr int64_t kAmxMinRows = 4;  // below this, AVX-512 streams the weights as fast with less overhead
constexpr int kMaxPanels = 4;       // C tiles 0..3, A tile 4, B tiles 5..7

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// C tiles 0-3 and A tile 4: M rows of 64 bytes; B tiles 5-7: 16 rows of 64 bytes.
AMX void configure(int64_t M) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = static_cast<uint8_t>(t < 5 ? M : 16);
  }
  _tile_loadconfig(&config);
}

// C[r] += A . B(panel r), for the panels r < R of one k chunk; B alternates over tiles 5, 6, 7.
template <int R, bool Int8>
AMX inline void multiply(const uint8_t* b, int64_t b_stride) {
#define AIGC_AMX_STEP(C, B)                                 \
  _tile_loadd(B, b + (C) * b_stride, 64);                   \
  if constexpr (Int8) _tile_dpbsud(C, 4, B); else _tile_dpbf16ps(C, 4, B);
  AIGC_AMX_STEP(0, 5)
  if constexpr (R > 1) { AIGC_AMX_STEP(1, 6) }
  if constexpr (R > 2) { AIGC_AMX_STEP(2, 7) }
  if constexpr (R > 3) { AIGC_AMX_STEP(3, 5) }
#undef AIGC_AMX_STEP
}

template <int R, class T>
AMX inline void store_c(T (*c)[16][16]) {
  _tile_stored(0, c[0], 64);
  if constexpr (R > 1) _tile_stored(1, c[1], 64);
  if constexpr (R > 2) _tile_stored(2, c[2], 64);
  if constexpr (R > 3) _tile_stored(3, c[3], 64);
}

AMX inline void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// y rows n..n+M, panels panel..panel+R from fp32 sums c[r][m][16] (masked past O)
template <int R>
AMX void store_y(const Problem& p, int64_t n, int64_t M, int64_t panel, float (*c)[16][16]) {
  for (int r = 0; r < R; ++r) {
    const int64_t o = (panel + r) * kPanel;
    const __mmask16 valid = p.O - o >= kPanel ? __mmask16(0xffff) : __mmask16((1u << (p.O - o)) - 1);
    for (int64_t m = 0; m < M; ++m) _mm512_mask_storeu_ps(p.y + (n + m) * p.ldy + o, valid, _mm512_loadu_ps(c[r][m]));
  }
}

template <int R>
AMX void bf16_tile(const Problem& p, int64_t n, int64_t M, int64_t panel) {
  const int64_t stride = p.groups * kPanel * 4;  // bytes per panel
  const auto* w = static_cast<const uint8_t*>(p.w) + panel * stride;
  const uint32_t* x = p.x.xg + n * p.x.ld;
  zero_c();
  for (int64_t chunk = 0; chunk < p.groups / 16; ++chunk) {
    _tile_loadd(4, x + chunk * 16, p.x.ld * 4);
    multiply<R, false>(w + chunk * 16 * 64, stride);
  }
  alignas(64) float c[kMaxPanels][16][16];
  store_c<R>(c);
  store_y<R>(p, n, M, panel, c);
}

template <int R>
AMX void int8_tile(const Problem& p, int64_t n, int64_t M, int64_t panel) {
  const auto [stride, w, x, sx] = Int8Operands(p, n, panel);
  alignas(64) float acc[kMaxPanels][16][16];
  alignas(64) int32_t c[kMaxPanels][16][16];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t b = 0; b < p.x.blocks; ++b) {
    zero_c();
    _tile_loadd(4, x + b * 16, p.x.ld * 4);
    multiply<R, true>(w + b * 16 * 64, stride);
    store_c<R>(c);
    for (int64_t m = 0; m < M; ++m) {
      const __m512 scale = _mm512_set1_ps(sx[m * p.x.blocks + b]);
      for (int r = 0; r < R; ++r)
        _mm512_store_ps(acc[r][m], _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[r][m])), scale,
                                                   _mm512_load_ps(acc[r][m])));
    }
  }
  store_y<R>(p, n, M, panel, acc);
}

template <void (*Tile1)(const Problem&, int64_t, int64_t, int64_t),
          void (*Tile2)(const Problem&, int64_t, int64_t, int64_t),
          void (*Tile3)(const Problem&, int64_t, int64_t, int64_t),
          void (*Tile4)(const Problem&, int64_t, int64_t, int64_t), WeightType T>
AMX void run_amx(const Problem& p, int64_t n0, int64_t n1, int64_t p0, int64_t p1) {
  if (n1 - n0 < kAmxMinRows) return avx512_kernel(T)(p, n0, n1, p0, p1);
  int64_t configured = 0;
  for (int64_t n = n0; n < n1; n += 16) {
    const int64_t M = std::min<int64_t>(16, n1 - n);
    if (M != configured) configure(configured = M);
    for (int64_t panel = p0; panel < p1; panel += kMaxPanels) {
      switch (std::min<int64_t>(kMaxPanels, p1 - panel)) {
        case 1: Tile1(p, n, M, panel); break;
        case 2: Tile2(p, n, M, panel); break;
        case 3: Tile3(p, n, M, panel); break;
        default: Tile4(p, n, M, panel); break;
      }
    }
  }
  _tile_release();
}

}  // namespace

bool amx_available() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // <asm/prctl.h>, Linux >= 5.16
  static const bool granted = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                              __builtin_cpu_supports("amx-int8") &&
                              syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  return granted;
}

MicroKernel amx_kernel(WeightType t) {
  switch (t) {
    case WeightType::bf16:
      return &run_amx<bf16_tile<1>, bf16_tile<2>, bf16_tile<3>, bf16_tile<4>, WeightType::bf16>;
    case WeightType::int8:
      return &run_amx<int8_tile<1>, int8_tile<2>, int8_tile<3>, int8_tile<4>, WeightType::int8>;
    case WeightType::f32: break;  // AMX has no fp32 multiply
    case WeightType::f16: break;  // (nor an fp16 one on these CPUs)
    case WeightType::int4: break;  // (nor a 4-bit one)
  }
  return nullptr;
}

}  // namespace aigc_rt::cpu::linear_detail
