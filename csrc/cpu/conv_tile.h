// The convolution micro-kernel (conv2d and conv_transpose), written once over a vector type V and included by
// each per-ISA translation unit (conv_avx512.cpp, conv_avx2.cpp) after its `#pragma GCC target` and its V.
// Everything here has internal linkage, so the two copies never mix.
//
// V provides: T (the register type), L (floats per register), zero(), set1(f), load(p), store(p, x),
// store_n(p, x, n) (first n lanes), store_bf16(p, x, n) (the first n lanes rounded to bf16 as vec.h's to_bf16,
// written as 16-bit values), fmadd(a, b, c) = a * b + c, add, sub, mul, div, max, abs,
// copysign(magnitude, sign), select_negative(x, a, b) (a where x's sign bit is set, else b), exp_nonpositive(x)
// (e^x for x <= 0, 1-2 ulp, 0 below -87: never a denormal); for the bf16 tiles set1_bits(u) (u's 32 bits in
// every lane) and dot_pairs(acc, a, b) (acc + a.hi * b.hi + a.lo * b.lo per lane, each 32-bit lane holding two
// bf16: lo the even input, hi the odd one).
//
// tile<V, MR, NV>: c[r][0:nr] = act(bias + sum over taps t, i < cin of a[t][r][i] * b[t][i][0:nr]), with
// MR x NV accumulator registers, nr = NV * L (see conv_isa.h). Tests: tests/test_cpu_conv.py.
#pragma once
#include <cstdint>
#include <cstring>

namespace {

using aigc_rt::cpu::conv::Act;
using aigc_rt::cpu::conv::Isa;
using aigc_rt::cpu::conv::TileArgs;
using aigc_rt::cpu::conv::TileFn;

// tanh(x) = sign(x) * (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1]: no overflow, absolute error ~1e-7.
template <class V>
inline typename V::T tanh_v(typename V::T x) {
  const typename V::T one = V::set1(1.f);
  const typename V::T e = V::exp_nonpositive(V::mul(V::set1(-2.f), V::abs(x)));
  return V::copysign(V::div(V::sub(one, e), V::add(one, e)), x);
}

// 1 / (1 + e^-x) from e = exp(-|x|) in (0, 1]: 1 / (1 + e) for x >= 0, e / (1 + e) below (no cancellation
// where the result is tiny, no overflow); relative error ~1e-7.
template <class V>
inline typename V::T sigmoid_v(typename V::T x) {
  const typename V::T e = V::exp_nonpositive(V::sub(V::zero(), V::abs(x)));
  const typename V::T r = V::div(V::set1(1.f), V::add(V::set1(1.f), e));
  return V::select_negative(x, V::mul(e, r), r);
}

template <class V>
inline typename V::T activate(typename V::T x, int act, float slope) {
  if (act == Act::kRelu) return V::max(x, V::zero());
  if (act == Act::kTanh) return tanh_v<V>(x);
  if (act == Act::kLeakyRelu) return V::select_negative(x, V::mul(x, V::set1(slope)), x);
  if (act == Act::kSigmoid) return sigmoid_v<V>(x);
  return x;
}

// c[r] = act(acc[r] + bias), the first n_valid columns written (as fp32, or rounded to bf16).
template <class V, int MR, int NV>
inline void store_tile(typename V::T (&acc)[MR][NV], const TileArgs& p) {
  for (int v = 0; v < NV; ++v) {
    const int n = p.n_valid - v * V::L;  // lanes of this vector to write
    if (n <= 0) break;
    const typename V::T bias = p.bias ? V::load(p.bias + v * V::L) : V::zero();
    for (int r = 0; r < MR; ++r) {
      const typename V::T y = activate<V>(V::add(acc[r][v], bias), p.act, p.slope);
      if (p.c_bf16)
        V::store_bf16(static_cast<uint16_t*>(p.c[r]) + v * V::L, y, n < V::L ? n : V::L);
      else if (n >= V::L)
        V::store(static_cast<float*>(p.c[r]) + v * V::L, y);
      else
        V::store_n(static_cast<float*>(p.c[r]) + v * V::L, y, n);
    }
  }
}

template <class V, int MR, int NV>
void tile(const TileArgs& p) {
  constexpr int NR = NV * V::L;
  typename V::T acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  for (int t = 0; t < p.taps; ++t) {
    const float* b = static_cast<const float*>(p.b[t]);
    const float* a[MR];
    for (int r = 0; r < MR; ++r) a[r] = static_cast<const float*>(p.a[t * MR + r]);
    for (int i = 0; i < p.cin; ++i, b += NR) {
      typename V::T bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = V::load(b + v * V::L);
      for (int r = 0; r < MR; ++r) {
        const typename V::T av = V::set1(a[r][i]);
        for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(av, bv[v], acc[r][v]);
      }
    }
  }
  store_tile<V, MR, NV>(acc, p);
}

// acc[r] += both products of pair[r] (two bf16 inputs of row r) with each column's weight pair at b.
template <class V, int MR, int NV>
inline void dot_step(typename V::T (&acc)[MR][NV], const uint32_t (&pair)[MR], const uint32_t* b) {
  typename V::T bv[NV];
  for (int v = 0; v < NV; ++v) bv[v] = V::load(reinterpret_cast<const float*>(b + v * V::L));
  for (int r = 0; r < MR; ++r) {
    const typename V::T av = V::set1_bits(pair[r]);
    for (int v = 0; v < NV; ++v) acc[r][v] = V::dot_pairs(acc[r][v], av, bv[v]);
  }
}

// bf16 rows and pair panels: each step broadcasts inputs (i, i + 1) of a row as one 32-bit pair and adds both
// products to every column; an odd last input is paired with a zero.
template <class V, int MR, int NV>
void tile_bf16(const TileArgs& p) {
  constexpr int NR = NV * V::L;
  typename V::T acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  const int pairs = p.cin / 2;
  for (int t = 0; t < p.taps; ++t) {
    const uint32_t* b = static_cast<const uint32_t*>(p.b[t]);
    const uint16_t* a[MR];
    for (int r = 0; r < MR; ++r) a[r] = static_cast<const uint16_t*>(p.a[t * MR + r]);
    uint32_t pair[MR];
    for (int i = 0; i < pairs; ++i, b += NR) {
      for (int r = 0; r < MR; ++r) std::memcpy(&pair[r], a[r] + 2 * i, sizeof(uint32_t));
      dot_step<V, MR, NV>(acc, pair, b);
    }
    if (p.cin & 1) {
      for (int r = 0; r < MR; ++r) pair[r] = a[r][2 * pairs];  // (a[cin - 1], 0)
      dot_step<V, MR, NV>(acc, pair, b);
    }
  }
  store_tile<V, MR, NV>(acc, p);
}

template <class V>
void act_run(float* x, int64_t n, int act, float slope) {
  if (act == Act::kNone) return;
  int64_t i = 0;
  for (; i + V::L <= n; i += V::L) V::store(x + i, activate<V>(V::load(x + i), act, slope));
  if (i < n) {
    float tail[V::L] = {};
    for (int64_t j = i; j < n; ++j) tail[j - i] = x[j];
    V::store_n(x + i, activate<V>(V::load(tail), act, slope), (int)(n - i));
  }
}

// The tables of tile kernels with NV vectors per row, for 1..RMAX rows (entry 0 and those above RMAX unused).
template <class V, int NV, int RMAX, int MR = 1>
void fill_tiles(TileFn (&row)[aigc_rt::cpu::conv::kMaxRows + 1], TileFn (&row_bf16)[aigc_rt::cpu::conv::kMaxRows + 1]) {
  if constexpr (MR <= RMAX) {
    row[MR] = &tile<V, MR, NV>;
    row_bf16[MR] = &tile_bf16<V, MR, NV>;
    fill_tiles<V, NV, RMAX, MR + 1>(row, row_bf16);
  }
}

// R1..R4: rows of the tile kernel with 1..4 vectors per row (accumulators + NV + 1 must fit the registers).
template <class V, int R1, int R2, int R3, int R4>
Isa make_isa(const char* name) {
  static_assert(R1 <= aigc_rt::cpu::conv::kMaxRows && R2 <= aigc_rt::cpu::conv::kMaxRows &&
                R3 <= aigc_rt::cpu::conv::kMaxRows && R4 <= aigc_rt::cpu::conv::kMaxRows);
  Isa isa{};
  isa.name = name;
  isa.lanes = V::L;
  isa.rows[1] = R1, isa.rows[2] = R2, isa.rows[3] = R3, isa.rows[4] = R4;
  fill_tiles<V, 1, R1>(isa.tile[1], isa.tile_bf16[1]);
  fill_tiles<V, 2, R2>(isa.tile[2], isa.tile_bf16[2]);
  fill_tiles<V, 3, R3>(isa.tile[3], isa.tile_bf16[3]);
  fill_tiles<V, 4, R4>(isa.tile[4], isa.tile_bf16[4]);
  isa.act = &act_run<V>;
  return isa;
}

}  // namespace
