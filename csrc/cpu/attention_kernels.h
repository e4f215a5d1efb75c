// Bodies of the attention kernels (formulas and problem structs in attention.cpp), written once against
// `Vec` (vec.h) and compiled once per ISA: attention.cpp includes this file inside the namespaces avx512,
// avx2 and scalar, each under its target attribute. No include guard on purpose.

#include "cpu/vec_rows.h"

// ---- decode: one query against keys [lo, hi) of its row, in chunks with an online softmax ------------

// s[j] = q . k_j for j < n. q: D floats zero-padded to a multiple of W; k rows: D values (KV = float or Bf16,
// the cache's type) at stride ks (loads of a row's tail are masked: the next row may be an unwritten cache
// slot holding NaN).
template <class KV>
static void dot_rows(const float* q, const KV* k, int64_t ks, int64_t n, int64_t D, float* s) {
  const int64_t Df = D / W * W;
  const int tail = D - Df;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // four keys at a time: four independent FMA chains
    const KV *k0 = k + j * ks, *k1 = k0 + ks, *k2 = k1 + ks, *k3 = k2 + ks;
    Vec a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
    for (int64_t d = 0; d < Df; d += W) {
      const Vec qd = Vec::load(q + d);
      a0 = Vec::fma(qd, Vec::load(k0 + d), a0);
      a1 = Vec::fma(qd, Vec::load(k1 + d), a1);
      a2 = Vec::fma(qd, Vec::load(k2 + d), a2);
      a3 = Vec::fma(qd, Vec::load(k3 + d), a3);
    }
    if (tail) {
      const Vec qd = Vec::load(q + Df);
      a0 = Vec::fma(qd, Vec::load(k0 + Df, tail), a0);
      a1 = Vec::fma(qd, Vec::load(k1 + Df, tail), a1);
      a2 = Vec::fma(qd, Vec::load(k2 + Df, tail), a2);
      a3 = Vec::fma(qd, Vec::load(k3 + Df, tail), a3);
    }
    s[j] = a0.sum(), s[j + 1] = a1.sum(), s[j + 2] = a2.sum(), s[j + 3] = a3.sum();
  }
  for (; j < n; ++j) {
    const KV* kj = k + j * ks;
    Vec a = Vec::zero();
    for (int64_t d = 0; d < Df; d += W) a = Vec::fma(Vec::load(q + d), Vec::load(kj + d), a);
    if (tail) a = Vec::fma(Vec::load(q + Df), Vec::load(kj + Df, tail), a);
    s[j] = a.sum();
  }
}

// o[0, NV*W) = alpha * o + sum_{j<n} p[j] v_j[0, NV*W); the last vector of each v row holds `last` valid lanes.
static constexpr int kPvVecs = W >= 8 ? 64 / W : 8;  // accumulators held in registers: 64 floats of o

template <int NV, class KV>
static void pv_tile(float* o, float alpha, const float* p, const KV* v, int64_t vs, int64_t n, int last) {
  Vec acc[NV];
  const Vec a = Vec::all(alpha);
#pragma GCC unroll 16
  for (int t = 0; t < NV; ++t) acc[t] = Vec::load(o + t * W) * a;
  for (int64_t j = 0; j < n; ++j) {
    const Vec pj = Vec::all(p[j]);
    const KV* vj = v + j * vs;
#pragma GCC unroll 16
    for (int t = 0; t < NV - 1; ++t) acc[t] = Vec::fma(pj, Vec::load(vj + t * W), acc[t]);
    acc[NV - 1] = Vec::fma(pj, Vec::load(vj + (NV - 1) * W, last), acc[NV - 1]);
  }
#pragma GCC unroll 16
  for (int t = 0; t < NV; ++t) acc[t].store(o + t * W);
}

// o = alpha * o + sum_{j<n} p[j] v_j over all D columns (o zero-padded to a multiple of W)
template <class KV>
static void pv(float* o, float alpha, const float* p, const KV* v, int64_t vs, int64_t n, int64_t D) {
  for (int64_t d0 = 0; d0 < D; d0 += kPvVecs * W) {
    const int nv = std::min<int64_t>(kPvVecs, (D - d0 + W - 1) / W);
    const int last = std::min<int64_t>(D - d0, nv * W) - (nv - 1) * W;
    with_count<kPvVecs>(nv, [&](auto NV) { pv_tile<NV()>(o + d0, alpha, p, v + d0, vs, n, last); });
  }
}

static constexpr int64_t kDecodeChunk = 256;  // keys scored per online-softmax step (scores stay in L1)

// item = ((b * H) + h) * splits + split: keys [len*split/splits, len*(split+1)/splits) of row b, head h.
template <class KV>
static void decode_item_kv(const DecodeProblem& p, int64_t item) {
  const int64_t split = item % p.splits, bh = item / p.splits, b = bh / p.H, h = bh % p.H, D = p.D;
  const int64_t len = p.lengths[b], lo = len * split / p.splits, hi = len * (split + 1) / p.splits;
  alignas(64) float q[kMaxHeadDim], o[kMaxHeadDim], s[kDecodeChunk];
  const float* qr = p.q + b * p.q_b + h * p.q_h;
  for (int64_t d = 0; d < round_up(D, W); ++d) q[d] = d < D ? qr[d] * p.scale : 0.f, o[d] = 0.f;
  const KV* k = static_cast<const KV*>(p.k) + b * p.k_b + h * p.k_h;
  const KV* v = static_cast<const KV*>(p.v) + b * p.v_b + h * p.v_h;
  float m = kNegInf, l = 0.f;  // running max of the scores and sum of exp(score - m)
  for (int64_t c = lo; c < hi; c += kDecodeChunk) {
    const int64_t n = std::min(kDecodeChunk, hi - c);
    dot_rows(q, k + c * p.k_s, p.k_s, n, D, s);
    const float m_new = std::max(m, max_of(s, n));
    const float alpha = std::exp(m - m_new);  // 0 on the first chunk
    l = l * alpha + (float)exp_shift_sum(s, s, n, m_new);
    pv(o, alpha, s, v + c * p.v_s, p.v_s, n, D);
    m = m_new;
  }
  if (p.splits == 1) {
    float* out = p.out + b * p.o_b + h * p.o_h;
    const float inv = 1.f / l;
    for (int64_t d = 0; d < D; ++d) out[d] = o[d] * inv;
  } else {  // (m, l, o) for the log-sum-exp merge in attention.cpp
    float* part = p.partial + item * (D + 2);
    part[0] = m, part[1] = l;
    std::copy(o, o + D, part + 2);
  }
}

static void decode_item(const DecodeProblem& p, int64_t item) {
  if (p.kv_bf16)
    decode_item_kv<Bf16>(p, item);
  else
    decode_item_kv<float>(p, item);
}

// ---- prefill: flash-attention blocks, kBQ query rows x kBK keys, online softmax over key blocks -------

static constexpr int MR = Vec::MR, NK = Vec::NK;  // register tile: MR rows x NK vectors
static constexpr int64_t kBQ = MR * 10;
static_assert(kPrefillKeyBlock % (NK * W) == 0, "a key block is a whole number of register tiles");
static constexpr int64_t kBK = kPrefillKeyBlock;

// item = (b * H + h) * key_blocks + kb: p.kt[item] (D, kBK) = keys [kb*kBK, +kBK) of (b, h), transposed,
// zero past T; p.vp[item] (kBK, Dp) = their values, zero-padded columns. Done once per call, so every query
// block reads ready-made, contiguous GEMM panels (strided inputs would cost a TLB miss per row).
static void pack_keys_values(const PrefillProblem& p, int64_t item) {
  const int64_t nkb = (p.T + kBK - 1) / kBK, kb = item % nkb, bh = item / nkb, D = p.D, Dp = round_up(D, W);
  const int64_t k0 = kb * kBK, nk = std::min(kBK, p.T - k0);
  const float* k = p.k + bh / p.H * p.k_b + bh % p.H * p.k_h + k0 * p.k_t;
  const float* v = p.v + bh / p.H * p.v_b + bh % p.H * p.v_h + k0 * p.v_t;
  float* kt = p.kt + item * D * kBK;
  float* vp = p.vp + item * kBK * Dp;
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t j = 0; j < kBK; j += W)  // lanes past nk gather nothing and store 0
      Vec::gather(k + j * p.k_t + d, (int32_t)p.k_t, (int)std::clamp<int64_t>(nk - j, 0, W)).store(kt + d * kBK + j);
  }
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t d = 0; d < Dp; d += W) Vec::load(v + j * p.v_t + d, (int)std::min<int64_t>(W, D - d)).store(vp + j * Dp + d);
}

// s[MR][NV*W] (row stride kBK) = qs[MR][D] x kt[D][NV*W] (row stride kBK)
template <int NV>
static void qk_tile(const float* qs, int64_t D, const float* kt, float* s) {
  Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) acc[r][t] = Vec::zero();
  for (int64_t d = 0; d < D; ++d) {
    Vec kv[NV];
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) kv[t] = Vec::load(kt + d * kBK + t * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec qb = Vec::all(qs[r * D + d]);
#pragma GCC unroll 8
      for (int t = 0; t < NV; ++t) acc[r][t] = Vec::fma(qb, kv[t], acc[r][t]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) acc[r][t].store(s + r * kBK + t * W);
}

// s[MR][kBK] (columns < n, rounded up to W) = qs[MR][D] x kt[D][kBK]
static void qk_tiles(const float* qs, int64_t D, const float* kt, int64_t n, float* s) {
  for (int64_t c = 0; c < n; c += NK * W) {
    const int nv = std::min<int64_t>(NK, (n - c + W - 1) / W);
    with_count<NK>(nv, [&](auto NV) { qk_tile<NV()>(qs, D, kt + c, s + c); });
  }
}

// o[MR][NV*W] (row stride Dp) = alpha[r] * o + p[MR][kBK](columns < n) x vp[n][NV*W] (row stride Dp)
template <int NV>
static void pv_block_tile(float* o, int64_t Dp, const float* alpha, const float* p, const float* vp, int64_t n) {
  Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const Vec a = Vec::all(alpha[r]);
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) acc[r][t] = Vec::load(o + r * Dp + t * W) * a;
  }
  for (int64_t j = 0; j < n; ++j) {
    Vec vv[NV];
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) vv[t] = Vec::load(vp + j * Dp + t * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec pb = Vec::all(p[r * kBK + j]);
#pragma GCC unroll 8
      for (int t = 0; t < NV; ++t) acc[r][t] = Vec::fma(pb, vv[t], acc[r][t]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < NV; ++t) acc[r][t].store(o + r * Dp + t * W);
}

// item: query block qb (the last, longest blocks first: better load balance) of row b, head h
static void prefill_item(const PrefillProblem& p, int64_t item) {
  const int64_t BH = p.B * p.H, nqb = (p.T + kBQ - 1) / kBQ, nkb = (p.T + kBK - 1) / kBK;
  const int64_t qb = nqb - 1 - item / BH, bh = item % BH, b = bh / p.H, h = bh % p.H;
  const int64_t D = p.D, Dp = round_up(D, W), q0 = qb * kBQ, nq = std::min(kBQ, p.T - q0);
  const int64_t nq_pad = round_up(nq, MR);
  float* qs = thread_scratch(ScratchSlot::worker, kBQ * D + kBQ * kBK + kBQ * Dp + 3 * kBQ);
  float* s = qs + kBQ * D;     // (kBQ, kBK): scores, then probabilities
  float* o = s + kBQ * kBK;    // (kBQ, Dp): unnormalised outputs
  float* m = o + kBQ * Dp;     // (kBQ,): running max
  float* l = m + kBQ;          // (kBQ,): running sum of exp(score - m)
  float* alpha = l + kBQ;      // (kBQ,): rescale of o for this key block

  const float* qbh = p.q + b * p.q_b + h * p.q_h;
  for (int64_t i = 0; i < nq; ++i) {  // scaled queries; padding rows are zero and never written out
    const float* qi = qbh + (q0 + i) * p.q_t;
    for (int64_t d = 0; d < D; ++d) qs[i * D + d] = qi[d] * p.scale;
  }
  std::fill(qs + nq * D, qs + nq_pad * D, 0.f);
  std::fill(o, o + nq_pad * Dp, 0.f);
  std::fill(m, m + nq_pad, kNegInf);
  std::fill(l, l + nq_pad, 0.f);
  const int64_t key_end = q0 + nq;  // causal: keys after the block's last query are never needed
  for (int64_t k0 = 0; k0 < key_end; k0 += kBK) {
    const int64_t nk = std::min(kBK, key_end - k0);
    const float* kt = p.kt + (bh * nkb + k0 / kBK) * D * kBK;
    const float* vp = p.vp + (bh * nkb + k0 / kBK) * kBK * Dp;
    // keys row tile [i0, i0 + MR) can see: the rest of the block is masked (P = 0), so skip it
    auto seen_by_tile = [&](int64_t i0) { return std::clamp<int64_t>(q0 + i0 + MR - k0, 0, nk); };
    for (int64_t i0 = 0; i0 < nq_pad; i0 += MR) qk_tiles(qs + i0 * D, D, kt, seen_by_tile(i0), s + i0 * kBK);
    for (int64_t i = 0; i < nq_pad; ++i) {  // online softmax over the causally visible keys of row i
      float* si = s + i * kBK;
      const int64_t visible = i < nq ? std::clamp<int64_t>(q0 + i - k0 + 1, 0, nk) : 0;
      if (visible == 0) {
        alpha[i] = 1.f;
        std::fill(si, si + nk, 0.f);
        continue;
      }
      const float m_new = std::max(m[i], max_of(si, visible));
      alpha[i] = std::exp(m[i] - m_new);
      l[i] = l[i] * alpha[i] + (float)exp_shift_sum(si, si, visible, m_new);
      std::fill(si + visible, si + nk, 0.f);
      m[i] = m_new;
    }
    for (int64_t i0 = 0; i0 < nq_pad; i0 += MR) {
      const int64_t n = seen_by_tile(i0);
      if (n == 0) continue;  // alpha is 1 for all its rows: nothing changes
      for (int64_t d0 = 0; d0 < Dp; d0 += NK * W) {
        const int nv = std::min<int64_t>(NK, (Dp - d0) / W);
        with_count<NK>(nv, [&](auto NV) {
          pv_block_tile<NV()>(o + i0 * Dp + d0, Dp, alpha + i0, s + i0 * kBK, vp + d0, n);
        });
      }
    }
  }
  float* obh = p.out + b * p.o_b + h * p.o_h;
  for (int64_t i = 0; i < nq; ++i) {
    float* out = obh + (q0 + i) * p.o_t;
    const float inv = 1.f / l[i];
    for (int64_t d = 0; d < D; ++d) out[d] = o[i * Dp + d] * inv;
  }
}

inline constexpr AttentionKernels attention_kernels{&decode_item, &pack_keys_values, &prefill_item, kBQ};
