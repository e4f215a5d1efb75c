// Bodies of the VAE's elementwise steps (semantics in vae.cpp), written once against `Vec` (vec.h) and compiled once
// per ISA: vae.cpp includes this file inside the namespaces avx512, avx2 and scalar. No include guard on purpose.

// log1p(u) for u in [0, 1] as 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = u / (2 + u) in [0, 1/3]: the series to
// s^19 leaves a relative error < 1e-9 (s^2 <= 1/9), and small u keep full relative precision (2s ~ u).
static inline Vec log1p_unit(Vec u) {
  const Vec s = u / (Vec::all(2.f) + u), s2 = s * s;
  Vec p = Vec::all(1.f / 19);
  for (int k = 17; k >= 1; k -= 2) p = Vec::fma(p, s2, Vec::all(1.f / k));
  return Vec::all(2.f) * s * p;
}

// One row: sum_d x_d l_d - softplus(l_d), softplus(l) = max(l, 0) + log1p(e^-|l|) (no overflow; exact where
// sigmoid(l) rounds to 0 or 1). Sums in W lanes, then across them.
static float bernoulli_log_likelihood_row(const float* logits, const float* x, int64_t D) {
  Vec acc = Vec::zero();
  for (int64_t d = 0; d < D; d += Vec::W) {
    const int n = (int)std::min<int64_t>(Vec::W, D - d);
    const Vec l = Vec::load(logits + d, n), xv = Vec::load(x + d, n);
    const Vec abs_l = Vec::max(l, Vec::zero() - l);
    const Vec softplus = Vec::max(l, Vec::zero()) + log1p_unit(Vec::exp(Vec::zero() - abs_l));
    acc = acc + Vec::select(Vec::first(n), xv * l - softplus, Vec::zero());  // padding lanes add nothing
  }
  return acc.sum();
}

// One row of z = mu + eps * exp(logvar / 2) over L values.
static void reparameterize_row(const float* mu, const float* logvar, const float* eps, float* z, int64_t L) {
  for (int64_t j = 0; j < L; j += Vec::W) {
    const int n = (int)std::min<int64_t>(Vec::W, L - j);
    const Vec std_dev = Vec::exp(Vec::all(0.5f) * Vec::load(logvar + j, n));
    Vec::fma(Vec::load(eps + j, n), std_dev, Vec::load(mu + j, n)).store(z + j, n);
  }
}

inline constexpr VaeKernels vae_kernels{&bernoulli_log_likelihood_row, &reparameterize_row};
