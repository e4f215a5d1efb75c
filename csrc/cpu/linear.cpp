// Linear layer on the CPU, streaming the weight from memory once per call:
//
//   y[n, o] = act( sum_k x[n, k] * W[o, k] * scale[o] + bias[o] ),   act = identity or GELU(tanh)
//
// x (N, K) fp32; W (O, K) as stored in the weights file: fp32, bf16 (activations rounded to bf16, fp32
// accumulation) or int8 with one fp32 scale per output row (symmetric, weight-only; activations are
// quantised to int8 per block of 64 inputs on the fly, with an fp32 scale per block, and the block dot
// products are exact in int32: this is llama.cpp's q8_0 activation scheme, see quantize_row below).
// The lm_head (vocab x C, tied to wte) is the same op.
//
// Work split: OpenMP threads take contiguous chunks of output rows (each streams its own part of W);
// inside a chunk, register tiles of 4 weight rows x up to 4 activation rows, so W is read once per block
// of activation rows (not once per row). The micro-kernel is picked at run time per weight type:
// AVX-512 (vdpbf16ps for bf16, VNNI vpdpbusd for int8), else AVX2+FMA, else portable C++.
// Tests: tests/test_cpu_linear.py (every ISA this CPU has, against plain-PyTorch fp32 math).
#include "cpu/linear.h"

#include <omp.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"

namespace aigc_rt::cpu {
using namespace linear_detail;

namespace {

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};
Isa g_isa_cap = Isa::avx512;  // set_linear_isa: the best ISA the kernels may use (tests force lower ones)

bool cpu_has(Isa isa, WeightType t) {
  switch (isa) {
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             (t != WeightType::bf16 || __builtin_cpu_supports("avx512bf16")) &&
             (t != WeightType::int8 || __builtin_cpu_supports("avx512vnni"));
    case Isa::avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::scalar: return true;
  }
  return false;
}

Isa pick_isa(WeightType t) {
  for (int i = static_cast<int>(g_isa_cap); i > 0; --i)
    if (cpu_has(static_cast<Isa>(i), t)) return static_cast<Isa>(i);
  return Isa::scalar;
}

// -- portable micro-kernel ----------------------------------------------------------------------------
inline float decode(float w) { return w; }
inline float decode(uint16_t w) { return std::bit_cast<float>(static_cast<uint32_t>(w) << 16); }
inline float decode(uint8_t w) { return static_cast<float>(static_cast<int>(w) - 128); }

template <class T>
void scalar_kernel(const Problem& p, int64_t n0, int64_t n1, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const T* w = static_cast<const T*>(p.w) + o * p.ldw;
    for (int64_t n = n0; n < n1; ++n) {
      const float* x = p.x.xf + n * p.x.ld;
      float sum = 0.f;
      for (int64_t k = 0; k < p.K; ++k) sum += x[k] * decode(w[k]);
      p.y[n * p.ldy + o] = sum;
    }
  }
}

MicroKernel kernel_for(Isa isa, WeightType t) {
  if (isa == Isa::avx512) return avx512_kernel(t);
  if (isa == Isa::avx2) return avx2_kernel(t);
  switch (t) {
    case WeightType::f32: return &scalar_kernel<float>;
    case WeightType::bf16: return &scalar_kernel<uint16_t>;
    case WeightType::int8: return &scalar_kernel<uint8_t>;
  }
  return nullptr;
}

// -- activations --------------------------------------------------------------------------------------
inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's .to(torch.bfloat16)
  const uint32_t b = std::bit_cast<uint32_t>(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// Quantise x[0:K] to int8 per block of kInt8Block: sx[b] = max|x_b| / 127, q = round(x * 127 / max|x_b|)
// (half to even, |q| <= 127). Writes q into xq[0:blocks*kInt8Block] (0 past K) and sx[0:blocks]. A block
// holding NaN/inf gets sx = NaN (and q = 0), so the non-finite value reaches the output. Returns
// sum_b sx[b] * sum_{k in b} q[k] (the VNNI kernel's shift, see linear.h).
float quantize_row(const float* x, int64_t K, int8_t* xq, float* sx) {
  const int64_t blocks = (K + kInt8Block - 1) / kInt8Block;
  float shift = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k0 = b * kInt8Block, len = std::min(kInt8Block, K - k0);
    float amax = 0.f, poison = 0.f;  // poison = 0 * x summed: NaN iff some x is NaN or inf
    for (int64_t i = 0; i < len; ++i) {
      amax = std::max(amax, std::fabs(x[k0 + i]));
      poison += 0.f * x[k0 + i];
    }
    int8_t* q = xq + k0;
    std::memset(q, 0, kInt8Block);
    if (!std::isfinite(poison) || amax == 0.f) {
      sx[b] = poison;  // NaN, or 0 for an all-zero block
      continue;
    }
    const float inv = 127.f / amax;
    int32_t qsum = 0;
    for (int64_t i = 0; i < len; ++i) {
      const float v = std::nearbyint(x[k0 + i] * inv);
      q[i] = static_cast<int8_t>(std::clamp(v, -127.f, 127.f));
      qsum += q[i];
    }
    sx[b] = amax / 127.f;
    shift += sx[b] * static_cast<float>(qsum);
  }
  return shift;
}

// A scratch buffer owned by the calling thread, grown when needed and never shrunk (so a decode step
// allocates nothing once the first step has sized it).
void* scratch(size_t bytes) {
  thread_local std::vector<std::byte> buf;
  if (buf.size() < bytes + 64) buf.resize(bytes + 64);
  return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
}

// -- epilogue -----------------------------------------------------------------------------------------
// exp(x), relative error < 2e-7 (Cephes expf polynomial); branch-free so that it vectorises.
inline float exp_approx(float x) {
  x = x < -87.f ? -87.f : x;
  x = x > 88.f ? 88.f : x;
  const float t = x * 1.44269504088896341f + 12582912.f;  // 1.5 * 2^23: round(x / ln 2) in the low bits
  const float n = t - 12582912.f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float e = 1.9875691500e-4f;
  e = e * r + 1.3981999507e-3f;
  e = e * r + 8.3334519073e-3f;
  e = e * r + 4.1665795894e-2f;
  e = e * r + 1.6666665459e-1f;
  e = e * r + 5.0000001201e-1f;
  e = e * r * r + r + 1.f;
  const int32_t pow2 = (std::bit_cast<int32_t>(t) - 0x4B400000 + 127) << 23;  // 2^n
  return e * std::bit_cast<float>(pow2);
}

// GELU, tanh form: 0.5 v (1 + tanh(u)) = v / (1 + exp(-2u)),  u = sqrt(2/pi) (v + 0.044715 v^3)
inline float gelu_tanh(float v) {
  const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
  return v / (1.f + exp_approx(-2.f * u));
}

// y[i] = act((y[i] - shift) * scale[i] + bias[i]) for one output row's span; scale/bias may be null.
__attribute__((target_clones("avx512f", "avx2", "default"))) void epilogue(float* y, int64_t count,
                                                                           const float* scale, float shift,
                                                                           const float* bias, bool gelu) {
  if (scale)
    for (int64_t i = 0; i < count; ++i) y[i] = (y[i] - shift) * scale[i];
  if (bias)
    for (int64_t i = 0; i < count; ++i) y[i] += bias[i];
  if (gelu)
    for (int64_t i = 0; i < count; ++i) y[i] = gelu_tanh(y[i]);
}

WeightType weight_type(const torch::Tensor& w) {
  switch (w.scalar_type()) {
    case torch::kFloat32: return WeightType::f32;
    case torch::kBFloat16: return WeightType::bf16;
    case torch::kUInt8: return WeightType::int8;
    case torch::kInt8:
      AIGC_CHECK(false, "linear: int8 weights must be packed with pack_int8 first (uint8 rows of q + 128)");
    default:
      AIGC_CHECK(false, "linear: weight dtype ", w.scalar_type(), " is not supported (float32, bfloat16, ",
                 "or int8 packed with pack_int8)");
  }
  return WeightType::f32;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

void check_vector(const c10::optional<torch::Tensor>& t, const char* name, int64_t O) {
  if (!t) return;
  AIGC_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == torch::kFloat32,
             "linear: ", name, " must be a contiguous float32 CPU tensor, got ", t->scalar_type(), " on ",
             t->device());
  AIGC_CHECK(t->dim() == 1 && t->size(0) == O, "linear: ", name, " has shape ", t->sizes(), ", expected [", O,
             "]");
}

}  // namespace

torch::Tensor pack_int8(const torch::Tensor& q) {
  AIGC_CHECK_CPU_CONTIGUOUS(q, torch::kInt8);
  AIGC_CHECK(q.dim() == 2 && q.size(0) > 0 && q.size(1) > 0, "pack_int8: expected a non-empty (out, in) matrix, ",
             "got shape ", q.sizes());
  const int64_t O = q.size(0), K = q.size(1), ldw = round_up(K, kInt8Block);
  auto packed = torch::empty({O, ldw}, torch::kUInt8);
  const int8_t* src = q.data_ptr<int8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < O; ++o) {
    for (int64_t k = 0; k < K; ++k) dst[o * ldw + k] = static_cast<uint8_t>(src[o * K + k] + 128);
    std::memset(dst + o * ldw + K, 128, ldw - K);
  }
  return packed;
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                     const c10::optional<torch::Tensor>& scale, bool gelu, const c10::optional<torch::Tensor>& out) {
  AIGC_CHECK_CPU_CONTIGUOUS(x, torch::kFloat32);
  AIGC_CHECK(x.dim() >= 1, "linear: x must have at least one dimension");
  AIGC_CHECK(weight.device().is_cpu() && weight.is_contiguous() && weight.dim() == 2,
             "linear: weight must be a contiguous 2-D CPU tensor, got shape ", weight.sizes(), " on ",
             weight.device());
  const WeightType wt = weight_type(weight);
  const int64_t K = x.size(-1), O = weight.size(0), N = x.numel() / std::max<int64_t>(K, 1);
  const int64_t ldw = weight.size(1);
  AIGC_CHECK(K > 0, "linear: x has 0 input features");
  AIGC_CHECK(ldw == (wt == WeightType::int8 ? round_up(K, kInt8Block) : K), "linear: weight ", weight.sizes(),
             (wt == WeightType::int8 ? " (packed int8)" : ""), " does not take ", K, " input features (x ",
             x.sizes(), ")");
  AIGC_CHECK((wt == WeightType::int8) == scale.has_value(),
             "linear: a scale is required for int8 weights and only for them");
  check_vector(scale, "scale", O);
  check_vector(bias, "bias", O);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = O;
  torch::Tensor y;
  if (out) {
    AIGC_CHECK_CPU_CONTIGUOUS(*out, torch::kFloat32);
    AIGC_CHECK(out->sizes() == c10::IntArrayRef(out_sizes), "linear: out has shape ", out->sizes(), ", expected ",
               c10::IntArrayRef(out_sizes));
    AIGC_CHECK(!overlap(*out, x), "linear: out must not overlap x");
    y = *out;
  } else {
    y = torch::empty(out_sizes, x.options());
  }
  if (N == 0) return y;

  const Isa isa = pick_isa(wt);
  const MicroKernel kernel = kernel_for(isa, wt);
  const float* xf = x.data_ptr<float>();
  // prepared activations in the scratch buffer: (N, ld) elements, then (N, blocks) scales, then (N,) shifts
  const bool bf16_dot = wt == WeightType::bf16 && isa == Isa::avx512;
  const bool int8_dot = wt == WeightType::int8 && isa == Isa::avx512;
  const int64_t ld = bf16_dot ? round_up(K, kBf16Pad) : int8_dot ? ldw : K;
  const int64_t blocks = round_up(K, kInt8Block) / kInt8Block;
  const size_t elem = bf16_dot ? 2 : int8_dot ? 1 : 4;
  const size_t x_bytes = round_up(N * ld * elem, 64), sx_bytes = round_up(N * blocks * 4, 64);
  auto* buf = static_cast<std::byte*>(wt == WeightType::f32 ? nullptr : scratch(x_bytes + sx_bytes + N * 4));
  float* sx = reinterpret_cast<float*>(buf + x_bytes);
  float* shift = reinterpret_cast<float*>(buf + x_bytes + sx_bytes);

  Problem p{};
  p.x.ld = ld;
  p.x.xf = wt == WeightType::f32 ? xf : reinterpret_cast<const float*>(buf);
  p.x.xh = reinterpret_cast<const uint16_t*>(buf);
  p.x.xq = reinterpret_cast<const int8_t*>(buf);
  p.x.sx = sx;
  p.w = weight.data_ptr();
  p.ldw = ldw;
  p.K = K;
  p.y = y.data_ptr<float>();
  p.ldy = O;
  const float* scale_p = scale ? scale->data_ptr<float>() : nullptr;
  const float* bias_p = bias ? bias->data_ptr<float>() : nullptr;

  // activation rows per block: the block's prepared rows stay in L2 while the weight chunk streams past
  const int64_t row_bytes = ld * static_cast<int64_t>(elem);
  const int64_t n_block = std::max<int64_t>(4, (512 * 1024 / row_bytes) / 4 * 4);
  const bool parallel = N * O * K >= (1 << 16);
#pragma omp parallel if (parallel)
  {
    if (wt != WeightType::f32) {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) {
        const float* xr = xf + n * K;
        if (bf16_dot) {
          uint16_t* dst = reinterpret_cast<uint16_t*>(buf) + n * ld;
          for (int64_t k = 0; k < ld; ++k) dst[k] = k < K ? to_bf16(xr[k]) : 0;
        } else if (wt == WeightType::bf16) {
          float* dst = reinterpret_cast<float*>(buf) + n * ld;
          for (int64_t k = 0; k < K; ++k) dst[k] = std::bit_cast<float>(static_cast<uint32_t>(to_bf16(xr[k])) << 16);
        } else if (int8_dot) {
          shift[n] = 128.f * quantize_row(xr, K, reinterpret_cast<int8_t*>(buf) + n * ld, sx + n * blocks);
        } else {  // int8 weights without VNNI: the same quantised activations, dequantised
          alignas(64) int8_t q[kInt8Block];
          float* dst = reinterpret_cast<float*>(buf) + n * ld;
          for (int64_t k0 = 0; k0 < K; k0 += kInt8Block) {
            float s;
            quantize_row(xr + k0, std::min(kInt8Block, K - k0), q, &s);
            for (int64_t i = 0; i < std::min(kInt8Block, K - k0); ++i) dst[k0 + i] = q[i] * s;
          }
          shift[n] = 0.f;
        }
      }
    }
    // contiguous chunks of output rows, in multiples of 4 (the register tile height)
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t chunk = round_up((O + threads - 1) / threads, 4);
    const int64_t o0 = std::min(O, t * chunk), o1 = std::min(O, o0 + chunk);
    for (int64_t n0 = 0; n0 < N && o0 < o1; n0 += n_block) {
      const int64_t n1 = std::min(N, n0 + n_block);
      kernel(p, n0, n1, o0, o1);
      if (scale_p || bias_p || gelu)
        for (int64_t n = n0; n < n1; ++n)
          epilogue(p.y + n * O + o0, o1 - o0, scale_p ? scale_p + o0 : nullptr, int8_dot ? shift[n] : 0.f,
                   bias_p ? bias_p + o0 : nullptr, gelu);
    }
  }
  return y;
}

std::string linear_isa(const std::string& weight_dtype) {
  const WeightType t = weight_dtype == "bf16" ? WeightType::bf16 : weight_dtype == "int8" ? WeightType::int8
                                                                                             : WeightType::f32;
  AIGC_CHECK(weight_dtype == "fp32" || weight_dtype == "bf16" || weight_dtype == "int8",
             "linear_isa: unknown weight dtype '", weight_dtype, "' (fp32, bf16, int8)");
  return kIsaNames[static_cast<int>(pick_isa(t))];
}

void set_linear_isa(const std::string& cap) {
  for (int i = 0; i < 3; ++i)
    if (cap == kIsaNames[i]) {
      g_isa_cap = static_cast<Isa>(i);
      return;
    }
  AIGC_CHECK(cap == "auto", "set_linear_isa: unknown ISA '", cap, "' (auto, avx512, avx2, scalar)");
  g_isa_cap = Isa::avx512;
}

}  // namespace aigc_rt::cpu
