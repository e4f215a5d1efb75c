// Body of the LSTM cell (semantics in lstm.cpp), written once against `Vec` (vec.h) and compiled once per ISA:
// lstm.cpp includes this file inside the namespaces avx512, avx2 and scalar. No include guard on purpose.

// sigmoid(x) = 1 / (1 + e^-x): Vec::exp clamps -x at 88, so a very negative x gives ~6e-39, not 0 (well within
// any tolerance), a very positive one exactly 1; NaN stays NaN.
static inline Vec sigmoid(Vec x) {
  const Vec one = Vec::all(1.f);
  return one / (one + Vec::exp(Vec::zero() - x));
}

// tanh(x) = sign(x) * (1 - e) / (1 + e), e = e^-2|x| in (0, 1]: no overflow, absolute error ~1e-7.
static inline Vec tanh_v(Vec x) {
  const Vec one = Vec::all(1.f), ax = Vec::max(x, Vec::zero() - x);
  const Vec e = Vec::exp(Vec::all(-2.f) * ax);
  const Vec t = (one - e) / (one + e);
  return Vec::select(Vec::lt(x, Vec::zero()), Vec::zero() - t, t);
}

// One row: gates (4H: input, forget, cell, output), c (H) -> h_out, c_out (H). c_out may be c.
static void cell_row(const float* gates, const float* c, float* h_out, float* c_out, int64_t H) {
  const float *gi = gates, *gf = gates + H, *gg = gates + 2 * H, *go = gates + 3 * H;
  for (int64_t j = 0; j < H; j += Vec::W) {
    const int n = (int)std::min<int64_t>(Vec::W, H - j);
    const Vec c_new = sigmoid(Vec::load(gf + j, n)) * Vec::load(c + j, n) +
                      sigmoid(Vec::load(gi + j, n)) * tanh_v(Vec::load(gg + j, n));
    const Vec h_new = sigmoid(Vec::load(go + j, n)) * tanh_v(c_new);
    c_new.store(c_out + j, n);
    h_new.store(h_out + j, n);
  }
}

inline constexpr LstmKernels lstm_kernels{&cell_row};
