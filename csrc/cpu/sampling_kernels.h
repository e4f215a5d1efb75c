// Body of the sampler (semantics and problem struct in sampling.cpp), written once against `Vec` (vec.h) and
// compiled once per ISA: sampling.cpp includes this file inside the namespaces avx512, avx2 and scalar.
// No include guard on purpose.

#include "cpu/vec_rows.h"

// Both one-pass scans below also tell whether x[0, n) is finite: x * 0 is NaN exactly for NaN and inf, and
// a NaN survives the sum.

// max of x[0, n); finite = no NaN or inf in x
static float max_and_finite(const float* x, int64_t n, bool& finite) {
  Vec mx = Vec::all(kNegInf), nan = Vec::zero();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec xi = Vec::load(x + i);
    mx = Vec::max(mx, xi);
    nan = Vec::fma(xi, Vec::zero(), nan);
  }
  if (i < n) {
    const Vec xi = Vec::load(x + i, n - i);
    mx = Vec::max(mx, Vec::select(Vec::first(n - i), xi, Vec::all(kNegInf)));
    nan = Vec::fma(xi, Vec::zero(), nan);
  }
  finite = nan.sum() == 0.f;
  return mx.hmax();
}

// z = x with HF's repetition penalty on seen tokens (x < 0 ? x * penalty : x / penalty), then divided by
// the temperature; each step rounds as the reference's fp32 torch ops do. seen may be null. Returns max z;
// finite = no NaN or inf in x.
static float penalise_and_scale(const float* x, const bool* seen, int64_t n, float penalty, float temperature,
                                float* z, bool& finite) {
  const Vec pen = Vec::all(penalty), temp = Vec::all(temperature);
  Vec mx = Vec::all(kNegInf), nan = Vec::zero();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec xi = Vec::load(x + i);
    Vec zi = xi;
    if (seen)
      zi = Vec::select(Vec::nonzero(seen + i), Vec::select(Vec::lt(xi, Vec::zero()), xi * pen, xi / pen), xi);
    if (temperature != 1.f) zi = zi / temp;
    zi.store(z + i);
    mx = Vec::max(mx, zi);
    nan = Vec::fma(xi, Vec::zero(), nan);
  }
  float m = mx.hmax(), nan_tail = 0.f;
  for (; i < n; ++i) {
    float zi = x[i];
    if (seen && seen[i]) zi = zi < 0.f ? zi * penalty : zi / penalty;
    if (temperature != 1.f) zi = zi / temperature;
    z[i] = zi;
    m = std::max(m, zi);
    nan_tail += x[i] * 0.f;
  }
  finite = nan.sum() + nan_tail == 0.f;
  return m;
}

// first i with z[i] == value (argmax given the max: the first maximal index, as torch.argmax)
static int64_t first_index_of(const float* z, int64_t n, float value) {
  const Vec v = Vec::all(value);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const uint32_t hit = Vec::bits(Vec::eq(Vec::load(z + i), v));
    if (hit) return i + __builtin_ctz(hit);
  }
  for (; i < n; ++i)
    if (z[i] == value) return i;
  return n - 1;  // unreachable: value is an element of z
}

// The k-th largest of z[0, n) counting repeats (torch.topk(z, k).values[-1]), 1 <= k < n. One pass keeps the
// values above a rising threshold in buf; when buf fills, nth_element keeps its top k and the threshold
// becomes the k-th of them (values not above it can no longer be the answer, and k are already held).
// buf: cap + W floats, k <= cap.
static float kth_largest(const float* z, int64_t n, int64_t k, float* buf, int64_t cap) {
  float threshold = kNegInf;
  int64_t held = 0;
  auto keep_top_k = [&] {
    std::nth_element(buf, buf + k - 1, buf + held, std::greater<float>());
    threshold = buf[k - 1], held = k;
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec x = Vec::load(z + i);
    if (!Vec::any(Vec::gt(x, Vec::all(threshold)))) continue;
    if (held + W > cap) keep_top_k();
    held += Vec::compress(buf + held, Vec::gt(x, Vec::all(threshold)), x);
  }
  for (; i < n; ++i) {
    if (!(z[i] > threshold)) continue;
    if (held + 1 > cap) keep_top_k();
    if (z[i] > threshold) buf[held++] = z[i];
  }
  if (held < k) return kNegInf;  // fewer than k values above -inf
  std::nth_element(buf, buf + k - 1, buf + held, std::greater<float>());
  return buf[k - 1];
}

// ids and values of the z[i] >= threshold, in id order; returns how many. ids, vals: n + W slots.
static int64_t collect_at_least(const float* z, int64_t n, float threshold, int32_t* ids, float* vals) {
  const Vec t = Vec::all(threshold);
  int64_t count = 0, i = 0;
  for (; i + W <= n; i += W) {
    const Vec x = Vec::load(z + i);
    const auto keep = Vec::ge(x, t);
    if (!Vec::any(keep)) continue;
    Vec::compress(vals + count, keep, x);
    count += Vec::compress_index(ids + count, keep, (int32_t)i);
  }
  for (; i < n; ++i)
    if (z[i] >= threshold) ids[count] = (int32_t)i, vals[count++] = z[i];
  return count;
}

// Top-p as a threshold on the weights w[0, n) (w = exp(z - max z), `total` their sum): the smallest t such
// that the weights strictly above t sum to less than P = top_p * total; the kept tokens are w >= t, and
// `kept` is set to their sum. Weighted quickselect (expected O(n)): partition the candidates around a pivot
// into greater / equal / smaller, and continue in the part that holds the boundary. a, b, c: n + W floats.
static float top_p_threshold(const float* w, int64_t n, double total, double P, float* a, float* b, float* c,
                             double& kept) {
  // No weight below `lo` can be kept: together they sum to at most n * lo = (total - P) / 2, so the weights
  // above them hold more than P. Dropping them first leaves few candidates for peaked distributions.
  const float lo = (float)((total - P) / (2.0 * n));
  int64_t m = 0, i = 0;
  for (; i + W <= n; i += W) {
    const Vec x = Vec::load(w + i);
    m += Vec::compress(a + m, Vec::ge(x, Vec::all(lo)), x);
  }
  for (; i < n; ++i)
    if (w[i] >= lo) a[m++] = w[i];
  kept = total;
  if (m == 0) return 0.f;  // rounding put P at the total: keep everything
  float *src = a, *greater = b, *smaller = c;
  double above = 0.0;  // sum of the weights above every candidate in src (always < P)
  for (;;) {
    float x0 = src[m / 4], x1 = src[m / 2], x2 = src[3 * m / 4];  // pivot: median of three
    if (x0 > x1) std::swap(x0, x1);
    const float pivot = std::max(x0, std::min(x1, x2));
    const Vec pv = Vec::all(pivot);
    Accumulator mass_greater;
    int64_t ng = 0, ns = 0, j = 0;
    for (; j + W <= m; j += W) {
      const Vec x = Vec::load(src + j);
      const auto gt = Vec::gt(x, pv);
      ng += Vec::compress(greater + ng, gt, x);
      ns += Vec::compress(smaller + ns, Vec::lt(x, pv), x);
      mass_greater.add(Vec::select(gt, x, Vec::zero()));
    }
    double mg = mass_greater.result();
    for (; j < m; ++j) {
      if (src[j] > pivot) greater[ng++] = src[j], mg += src[j];
      if (src[j] < pivot) smaller[ns++] = src[j];
    }
    if (above + mg >= P) {  // the pivot's group is already past the boundary: it lies among the greater
      std::swap(src, greater);
      m = ng;
      continue;
    }
    const double through_pivot = above + mg + (double)(m - ng - ns) * pivot;
    if (through_pivot >= P || ns == 0) {  // the pivot's group is the last one kept
      kept = through_pivot;
      return pivot;
    }
    above = through_pivot;
    std::swap(src, smaller);
    m = ns;
  }
}

// Inverse CDF in id order over the kept weights (w >= t, summing to `kept`): the first one whose running sum
// exceeds u * kept; if rounding leaves none, the last kept one with weight > 0. Returns its id (ids[i], or i
// when ids is null).
static int64_t draw(const float* w, const int32_t* ids, int64_t n, float t, double kept, float u) {
  const Vec tv = Vec::all(t);
  const double target = (double)u * kept;
  auto id = [&](int64_t j) { return ids ? (int64_t)ids[j] : j; };
  double acc = 0.0;
  int64_t i = 0;
  for (; i < n; i += W) {
    const int r = (int)std::min<int64_t>(W, n - i);
    if (r == W) {  // skip whole vectors that stay below the target
      const Vec x = Vec::load(w + i);
      const float block = Vec::select(Vec::ge(x, tv), x, Vec::zero()).sum();
      if (acc + block <= target) {
        acc += block;
        continue;
      }
    }
    for (int j = 0; j < r; ++j) {
      if (!(w[i + j] >= t)) continue;
      acc += w[i + j];
      if (acc > target) return id(i + j);
    }
  }
  for (i = n - 1; i > 0; --i)
    if (w[i] >= t && w[i] > 0.f) break;
  return id(i);
}

// One row: -1 if its logits hold NaN/inf; greedy argmax; or temperature, top-k, top-p and the draw.
static int64_t sample_row(const SampleProblem& p, int64_t row) {
  const int64_t V = p.V, slot = V + W;
  const float* x = p.logits + row * p.logits_stride;
  const bool* seen = p.seen ? p.seen + row * p.seen_stride : nullptr;
  const float temperature = p.do_sample ? p.temperature : 1.f;
  float* zbuf = thread_scratch(ScratchSlot::worker, 6 * slot);
  float* w = zbuf + slot;
  int32_t* ids = reinterpret_cast<int32_t*>(w + slot);
  float *a = w + 2 * slot, *b = a + slot, *c = b + slot;

  const float* z = x;  // penalised, scaled logits
  float zmax;
  bool finite;
  if (seen || temperature != 1.f) {
    zmax = penalise_and_scale(x, seen, V, p.penalty, temperature, zbuf, finite);
    z = zbuf;
  } else {
    zmax = max_and_finite(x, V, finite);
  }
  if (!finite) return -1;
  if (!p.do_sample) return first_index_of(z, V, zmax);
  if (!std::isfinite(zmax)) return -1;  // the penalty or temperature overflowed fp32

  const float* cand = z;  // candidates: all tokens, or the top-k (values in b, ids in ids)
  const int32_t* cand_ids = nullptr;
  int64_t n = V;
  if (p.top_k > 0) {
    const float kth = kth_largest(z, V, p.top_k, a, std::min<int64_t>(V, 2 * p.top_k + 256));
    n = collect_at_least(z, V, kth, ids, b);
    cand = b, cand_ids = ids;
  }
  const double total = exp_shift_sum(cand, w, n, zmax);
  double kept = total;
  const float t = p.top_p < 1.f ? top_p_threshold(w, n, total, (double)p.top_p * total, a, b, c, kept) : 0.f;
  return draw(w, cand_ids, n, t, kept, p.u[row]);
}

inline constexpr SamplingKernels sampling_kernels{&sample_row};
