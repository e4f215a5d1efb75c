// Scaled dot-product attention (fp32), the two shapes a decoder needs. scale = 1/sqrt(D).
//
// attention_decode: one query per sequence over its first len[b] cached positions, all heads at once
// (the caches fp32 or bf16, widened to fp32 as they are read):
//   out[b,h,:] = sum_{j < len[b]} softmax_j(scale * q[b,h,:] . k[b,h,j,:]) v[b,h,j,:]
//   OpenMP over (b, h); when B*H is small next to the thread count and the cache is long, each row's keys
//   are also split into `splits` spans whose partial results (m, l, o) merge by log-sum-exp
//   (flash-decoding):  M = max_s m_s,  out = sum_s e^{m_s - M} o_s / sum_s e^{m_s - M} l_s.
//   Slots at or past len[b] are never read (a cache may hold anything there, even NaN).
// attention_prefill: causal self-attention of T positions,
//   out[b,h,i,:] = sum_{j <= i} softmax_j(scale * q[b,h,i,:] . k[b,h,j,:]) v[b,h,j,:]
//   flash-attention style: blocks of query rows per OpenMP task, an online softmax over blocks of keys,
//   register-tiled Q K^T and P V products on key/value panels packed once per call; the T x T matrix never
//   exists.
//   Inputs may have any strides with a contiguous last dim (e.g. (B,T,H,D) tensors viewed as (B,H,T,D)).
// Kernel bodies: attention_kernels.h (one copy per ISA, see vec.h). Tests: tests/test_cpu_attention.py.
#include <omp.h>

#include <algorithm>

#include "common.h"
#include "cpu/ops.h"
#include "cpu/scratch.h"
#include "cpu/vec.h"

namespace aigc_rt::cpu {

constexpr int64_t kMaxHeadDim = 512;     // stack buffers of the decode kernel
constexpr int64_t kMinSplitKeys = 256;   // flash-decoding: never split a row into spans shorter than this

struct DecodeProblem {
  const float* q;                  // (B, H, D)
  const void *k, *v;               // (B, H, S, D): float, or Bf16 when kv_bf16; strides in elements
  const int64_t* lengths;          // (B,)
  float* out;                      // (B, H, D)
  float* partial;                  // (B*H*splits, D + 2): m, l, o per span, when splits > 1
  int64_t q_b, q_h, k_b, k_h, k_s, v_b, v_h, v_s, o_b, o_h;
  int64_t H, D, splits;
  float scale;
  bool kv_bf16;
};

constexpr int64_t kPrefillKeyBlock = 64;  // keys per prefill block

struct PrefillProblem {
  const float *q, *k, *v;  // (B, H, T, D) each, strides in elements
  float* out;              // (B, H, T, D)
  float* kt;               // (B*H, key blocks, D, kPrefillKeyBlock): the keys, transposed per block
  float* vp;               // (B*H, key blocks, kPrefillKeyBlock, D rounded up to the vector width): the values
  int64_t q_b, q_h, q_t, k_b, k_h, k_t, v_b, v_h, v_t, o_b, o_h, o_t;
  int64_t B, H, T, D;
  float scale;
};

struct AttentionKernels {
  void (*decode_item)(const DecodeProblem&, int64_t item);
  void (*pack_keys_values)(const PrefillProblem&, int64_t item);
  void (*prefill_item)(const PrefillProblem&, int64_t item);
  int64_t prefill_block_rows;  // query rows per prefill item
};

}  // namespace aigc_rt::cpu

AIGC_BEGIN_AVX512
namespace aigc_rt::cpu::avx512 {
#include "cpu/attention_kernels.h"
}
AIGC_END_TARGET

AIGC_BEGIN_AVX2
namespace aigc_rt::cpu::avx2 {
#include "cpu/attention_kernels.h"
}
AIGC_END_TARGET

namespace aigc_rt::cpu::scalar {
#include "cpu/attention_kernels.h"
}

namespace aigc_rt::cpu {

static const AttentionKernels& kernels() {
  return for_active_isa(scalar::attention_kernels, avx2::attention_kernels, avx512::attention_kernels);
}

static void check_float(const torch::Tensor& t, const char* name, int64_t dim) {
  AIGC_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  AIGC_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
  AIGC_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
  AIGC_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must be contiguous in its last dim, got strides ",
             t.strides());
}

// Whether the memory spans of two tensors intersect (conservative for strided views).
static bool overlap(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto span = [](const torch::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* first = static_cast<const char*>(t.data_ptr());
    return std::pair{first, first + (last + 1) * t.element_size()};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

// The output: `out` when given (checked), else a new tensor of `shape` laid out in memory as `layout`
// (a permutation of the dims) and returned as a view of that shape.
static torch::Tensor output(const std::optional<torch::Tensor>& out, at::IntArrayRef shape, at::IntArrayRef layout,
                            std::initializer_list<const torch::Tensor*> inputs, const char* op) {
  if (!out) {
    std::vector<int64_t> sizes, back(layout.size());
    for (size_t i = 0; i < layout.size(); ++i) sizes.push_back(shape[layout[i]]), back[layout[i]] = i;
    return torch::empty(sizes, torch::kFloat32).permute(back);
  }
  check_float(*out, "out", shape.size());
  AIGC_CHECK(out->sizes() == shape, op, ": out has shape ", out->sizes(), ", expected ", shape);
  for (const torch::Tensor* in : inputs)
    AIGC_CHECK(!overlap(*out, *in), op, ": out overlaps an input");
  return *out;
}

torch::Tensor attention_decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& lengths, int64_t max_len, const std::optional<torch::Tensor>& out,
                               int64_t splits) {
  check_float(q, "q", 3);
  check_kv_cache(k_cache, "k_cache");
  check_kv_cache(v_cache, "v_cache");
  AIGC_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "attention_decode: k_cache is ", k_cache.scalar_type(),
             " but v_cache is ", v_cache.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), S = k_cache.size(2);
  AIGC_CHECK(k_cache.sizes() == v_cache.sizes(), "attention_decode: k_cache ", k_cache.sizes(), " and v_cache ",
             v_cache.sizes(), " differ");
  AIGC_CHECK(k_cache.size(0) == B && k_cache.size(1) == H && k_cache.size(3) == D, "attention_decode: caches ",
             k_cache.sizes(), " do not match q ", q.sizes(), " (expected (B, H, S, D))");
  AIGC_CHECK(D >= 1 && D <= kMaxHeadDim, "attention_decode: head dim ", D, " is outside [1, ", kMaxHeadDim, "]");
  AIGC_CHECK(max_len >= 1 && max_len <= S, "attention_decode: max_len ", max_len, " is outside [1, ", S,
             "] (the cache length)");
  AIGC_CHECK(lengths.device().is_cpu() && lengths.scalar_type() == torch::kInt64 && lengths.dim() == 1 &&
                 lengths.size(0) == B && lengths.is_contiguous(),
             "attention_decode: lengths must be a contiguous CPU int64 tensor of shape (", B, "), got ",
             lengths.scalar_type(), " ", lengths.sizes());
  AIGC_CHECK(splits >= 0, "attention_decode: splits must be >= 0 (0: choose), got ", splits);
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    AIGC_CHECK(len[b] >= 1 && len[b] <= max_len, "attention_decode: lengths[", b, "] = ", len[b],
               " is outside [1, max_len = ", max_len, "]");
  torch::Tensor o = output(out, {B, H, D}, {0, 1, 2}, {&q, &k_cache, &v_cache}, "attention_decode");
  if (B == 0 || H == 0) return o;

  const int64_t BH = B * H, threads = omp_get_max_threads();
  if (splits == 0)
    splits = BH >= 2 * threads ? 1 : std::clamp<int64_t>((4 * threads + BH - 1) / BH, 1, max_len / kMinSplitKeys);
  splits = std::clamp<int64_t>(splits, 1, max_len);
  const int64_t items = BH * splits;
  DecodeProblem p{q.data_ptr<float>(), k_cache.data_ptr(), v_cache.data_ptr(), len,
                  o.data_ptr<float>(), splits > 1 ? thread_scratch(ScratchSlot::host, items * (D + 2)) : nullptr,
                  q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                  v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1),
                  H, D, splits, 1.f / std::sqrt((float)D), k_cache.scalar_type() == torch::kBFloat16};
  const auto decode_item = kernels().decode_item;
#pragma omp parallel for schedule(dynamic) if (items > 1)
  for (int64_t item = 0; item < items; ++item) decode_item(p, item);
  if (splits > 1) {
    for (int64_t bh = 0; bh < BH; ++bh) {  // log-sum-exp merge of the spans (B*H*splits*D flops: tiny)
      const float* part = p.partial + bh * splits * (D + 2);
      float M = -std::numeric_limits<float>::infinity(), denom = 0.f;
      for (int64_t s = 0; s < splits; ++s) M = std::max(M, part[s * (D + 2)]);
      float* od = p.out + bh / H * p.o_b + bh % H * p.o_h;
      std::fill(od, od + D, 0.f);
      for (int64_t s = 0; s < splits; ++s) {
        const float* ps = part + s * (D + 2);
        if (ps[1] == 0.f) continue;  // an empty span (a row shorter than `splits`)
        const float w = std::exp(ps[0] - M);
        denom += w * ps[1];
        for (int64_t d = 0; d < D; ++d) od[d] += w * ps[2 + d];
      }
      for (int64_t d = 0; d < D; ++d) od[d] /= denom;
    }
  }
  return o;
}

torch::Tensor attention_prefill(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const std::optional<torch::Tensor>& out) {
  check_float(q, "q", 4);
  check_float(k, "k", 4);
  check_float(v, "v", 4);
  AIGC_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(), "attention_prefill: q ", q.sizes(), ", k ",
             k.sizes(), " and v ", v.sizes(), " must have the same shape (B, H, T, D)");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  AIGC_CHECK(D >= 1 && D <= kMaxHeadDim, "attention_prefill: head dim ", D, " is outside [1, ", kMaxHeadDim, "]");
  AIGC_CHECK(k.stride(2) <= INT32_MAX / 16, "attention_prefill: k's position stride ", k.stride(2),
             " is too large (the kernel gathers keys with int32 offsets)");
  // new outputs are laid out (B, T, H, D): the caller's transpose(1, 2).reshape(B*T, H*D) is then free
  torch::Tensor o = output(out, {B, H, T, D}, {0, 2, 1, 3}, {&q, &k, &v}, "attention_prefill");
  if (B == 0 || H == 0 || T == 0) return o;

  const int64_t key_blocks = B * H * ((T + kPrefillKeyBlock - 1) / kPrefillKeyBlock);
  const int64_t panel = kPrefillKeyBlock * round_up(D, 16);  // floats per key block and panel (16: widest Vec)
  float* panels = thread_scratch(ScratchSlot::host, 2 * key_blocks * panel);
  PrefillProblem p{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), o.data_ptr<float>(),
                   panels, panels + key_blocks * panel,
                   q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
                   B, H, T, D, 1.f / std::sqrt((float)D)};
  const AttentionKernels& kern = kernels();
  const int64_t items = B * H * ((T + kern.prefill_block_rows - 1) / kern.prefill_block_rows);
#pragma omp parallel if (items > 1)
  {
#pragma omp for schedule(static)
    for (int64_t item = 0; item < key_blocks; ++item) kern.pack_keys_values(p, item);
#pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < items; ++item) kern.prefill_item(p, item);
  }
  return o;
}

}  // namespace aigc_rt::cpu
