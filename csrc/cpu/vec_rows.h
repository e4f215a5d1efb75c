// Row helpers shared by the kernel bodies, written against `Vec` and compiled once per ISA: included at the
// top of each *_kernels.h, inside its ISA namespace (see vec.h). No include guard on purpose.

static constexpr int W = Vec::W;
static constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A sum of many floats: vector partial sums flushed into a double every 64 vectors, so the fp32 rounding
// error stays ~1e-6 relative whatever the count.
struct Accumulator {
  Vec part = Vec::zero();
  int count = 0;
  double total = 0.0;
  void add(Vec x) {
    part = part + x;
    if (++count == 64) flush();
  }
  void flush() {
    total += part.sum();
    part = Vec::zero(), count = 0;
  }
  double result() {
    flush();
    return total;
  }
};

// max of x[0, n), n >= 1
static inline float max_of(const float* x, int64_t n) {
  Vec m = Vec::all(kNegInf);
  int64_t i = 0;
  for (; i + W <= n; i += W) m = Vec::max(m, Vec::load(x + i));
  if (i < n) m = Vec::max(m, Vec::select(Vec::first(n - i), Vec::load(x + i, n - i), Vec::all(kNegInf)));
  return m.hmax();
}

// out[j] = exp(x[j] - shift) for j < n (out may be x); returns their sum
static inline double exp_shift_sum(const float* x, float* out, int64_t n, float shift) {
  const Vec sh = Vec::all(shift);
  Accumulator acc;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec e = Vec::exp(Vec::load(x + i) - sh);
    e.store(out + i);
    acc.add(e);
  }
  if (i < n) {
    const int r = n - i;
    const Vec e = Vec::select(Vec::first(r), Vec::exp(Vec::load(x + i, r) - sh), Vec::zero());
    e.store(out + i, r);
    acc.add(e);
  }
  return acc.result();
}
