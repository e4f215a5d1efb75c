// Linear layer on the CPU, streaming the weight from memory once per call:
//
//   y[n, o] = act( sum_k x[n, k] * W[o, k] * scale[o] + bias[o] ),   act = identity, GELU(tanh) or ReLU
//   and with a residual (a transformer sub-layer's output added into the residual stream): residual[n, o] += y[n, o]
//
// x (N, K) fp32; W (O, K) from the weights file: fp32, fp16 or bf16 (activations rounded to fp16 / bf16, fp32
// accumulation) or int8 with one fp32 scale per output row (symmetric, weight-only; activations are
// quantised to int8 per block of 64 inputs on the fly, with an fp32 scale per block, and the block dot
// products are exact in int32: llama.cpp's q8_0 activation scheme, see quantize_block below), or int4 with
// one fp32 scale per output row and block of 64 inputs (uint8 nibble pairs in the file, aigc_rt/format.py; the same
// int8 activation blocks, each block's int32 sum scaled inside the kernel: linear.h). The lm_head (vocab x C,
// tied to wte) is the same op.
//
// PackedLinear repacks W once at load into panels of 16 output rows (linear.h). Work split: OpenMP threads
// take contiguous runs of panels; inside, register tiles of up to 4 panels x 8 activation rows, so W is
// streamed once per call for up to 8 rows (decode) and once per 8-row tile from cache beyond (prefill).
// The micro-kernel is picked at run time per weight type: AMX (bf16 and int8, for 4+ activation rows),
// AVX-512 (vdpbf16ps for bf16, VNNI vpdpbusd for int8 and int4; without those extensions, "avx512f": bf16 widened to
// fp32 in registers, int8 / int4 by vpmaddubsw + vpmaddwd; fp16 by vcvtph2ps), else AVX2+FMA+F16C, else portable C++.
// Tests: tests/test_cpu_linear.py (every ISA this CPU has, against plain-PyTorch fp32 math).
#include "cpu/linear.h"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include <immintrin.h>

#include "common.h"
#include "cpu/ops.h"
#include "cpu/vec.h"

namespace aigc_rt::cpu {
using namespace linear_detail;

namespace {

// avx512f: AVX-512 (F, BW, VL, DQ) without avx512_bf16 / VNNI (its bf16 kernel widens the weights to fp32 in registers,
// its int8 and int4 ones multiply with vpmaddubsw + vpmaddwd); avx512: with them (vdpbf16ps, vpdpbusd)
enum class LinearIsa { scalar = 0, avx2 = 1, avx512f = 2, avx512 = 3, amx = 4 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512f", "avx512", "amx"};
constexpr int kIsas = sizeof(kIsaNames) / sizeof(kIsaNames[0]);
const char* const kTypeNames[] = {"fp32", "bf16", "int8", "int4", "fp16"};  // by WeightType
constexpr int kTypes = sizeof(kTypeNames) / sizeof(kTypeNames[0]);
LinearIsa g_isa_cap = LinearIsa::amx;  // set_linear_isa: the best ISA the kernels may use (tests force lower ones)

bool cpu_has(LinearIsa isa, WeightType t) {
  switch (isa) {
    case LinearIsa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             (t != WeightType::bf16 || __builtin_cpu_supports("avx512bf16")) &&
             ((t != WeightType::int8 && t != WeightType::int4) || __builtin_cpu_supports("avx512vnni"));
    case LinearIsa::avx512f:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case LinearIsa::amx:
      return (t == WeightType::bf16 || t == WeightType::int8) && cpu_has(LinearIsa::avx512, t) && amx_available();
    case LinearIsa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case LinearIsa::scalar: return true;
  }
  return false;
}

// The extension-wide choice (set_simd_isa, vec.h) caps the linear kernels too; set_linear_isa caps them further
// (it alone can tell AMX from AVX-512).
LinearIsa isa_cap() {
  switch (active_isa()) {
    case Isa::scalar: return LinearIsa::scalar;
    case Isa::avx2: return std::min(g_isa_cap, LinearIsa::avx2);
    default: return g_isa_cap;
  }
}

LinearIsa pick_isa(WeightType t) {
  for (int i = static_cast<int>(isa_cap()); i > 0; --i)
    if (cpu_has(static_cast<LinearIsa>(i), t)) return static_cast<LinearIsa>(i);
  return LinearIsa::scalar;
}

// k values per packed group (int4: per activation quad), and the packed K, by weight type (linear.h)
constexpr bool one_k_a_group(WeightType t) { return t == WeightType::f32 || t == WeightType::f16; }
constexpr int64_t group_size(WeightType t) { return one_k_a_group(t) ? 1 : t == WeightType::bf16 ? 2 : 4; }
int64_t packed_k(WeightType t, int64_t K) {
  return round_up(K, t == WeightType::bf16 ? kBf16Chunk : one_k_a_group(t) ? 1 : kInt8Block);
}

// -- portable micro-kernel (int8: u = q + 128, the epilogue subtracts the 128, see linear.h) -----------------
inline float decode(float w) { return w; }
inline float decode(uint16_t w) { return std::bit_cast<float>(static_cast<uint32_t>(w) << 16); }  // bf16
inline float decode(c10::Half w) { return static_cast<float>(w); }
inline float decode(uint8_t w) { return static_cast<float>(w); }

template <class T, int64_t G>
void scalar_kernel(const Problem& p, int64_t n0, int64_t n1, int64_t p0, int64_t p1) {
  const T* w = static_cast<const T*>(p.w);
  for (int64_t o = p0 * kPanel; o < std::min(p.O, p1 * kPanel); ++o) {
    const int64_t panel = o / kPanel, lane = o % kPanel;
    for (int64_t n = n0; n < n1; ++n) {
      const float* x = p.x.xf + n * p.x.ld;
      float sum = 0.f;
      for (int64_t k = 0; k < p.K; ++k)
        sum += x[k] * decode(w[((panel * p.groups + k / G) * kPanel + lane) * G + k % G]);
      p.y[n * p.ldy + o] = sum;
    }
  }
}

// int4, every ISA's math (linear.h): per block, the exact integer sum of u * xq less the offset, then one fused
// multiply-add by ws * sx
void scalar_int4_kernel(const Problem& p, int64_t n0, int64_t n1, int64_t p0, int64_t p1) {
  for (int64_t panel = p0; panel < p1; ++panel)
    for (int64_t lane = 0; lane < kPanel && panel * kPanel + lane < p.O; ++lane)
      for (int64_t n = n0; n < n1; ++n) {
        const Int4Operands op(p, n, panel);
        const auto* xq = reinterpret_cast<const int8_t*>(op.x);
        float acc = 0.f;
        for (int64_t b = 0; b < p.x.blocks; ++b) {
          const uint8_t* block = op.w + b * kInt4BlockBytes;
          const int8_t* xb = xq + b * kInt8Block;
          int32_t sum = 0;
          for (int64_t i = 0; i < 8; ++i)
            for (int64_t j = 0; j < 4; ++j) {
              const uint8_t pair = block[(i * kPanel + lane) * 4 + j];
              sum += (pair & 15) * xb[4 * i + j] + (pair >> 4) * xb[4 * (i + 8) + j];
            }
          const float ws = reinterpret_cast<const float*>(block + kInt4Nibbles)[lane];
          acc = std::fma(static_cast<float>(sum - op.offset[b]), ws * op.sx[b], acc);
        }
        p.y[n * p.ldy + panel * kPanel + lane] = acc;
      }
}

MicroKernel kernel_for(LinearIsa isa, WeightType t) {
  if (isa == LinearIsa::amx) return amx_kernel(t);
  if (isa == LinearIsa::avx512) return avx512_kernel(t);
  if (isa == LinearIsa::avx512f) return avx512f_kernel(t);
  if (isa == LinearIsa::avx2) return avx2_kernel(t);
  switch (t) {
    case WeightType::f32: return &scalar_kernel<float, 1>;
    case WeightType::f16: return &scalar_kernel<c10::Half, 1>;
    case WeightType::bf16: return &scalar_kernel<uint16_t, 2>;
    case WeightType::int8: return &scalar_kernel<uint8_t, 4>;
    case WeightType::int4: return &scalar_int4_kernel;
  }
  return nullptr;
}

// -- activations --------------------------------------------------------------------------------------
// Quantise x[0:len] (len <= kInt8Block) to int8: s = max|x| / 127, q = round(x * 127 / max|x|) (half to
// even, |q| <= 127), q = 0 past len. A block holding NaN/inf gets s = NaN (and q = 0), so the non-finite
// value reaches the output. Returns sum(q).
int32_t quantize_block(const float* x, int64_t len, int8_t* q, float* s) {
  float amax = 0.f, poison = 0.f;  // poison = sum of 0 * x: NaN iff some x is NaN or inf
  for (int64_t i = 0; i < len; ++i) {
    amax = std::max(amax, std::fabs(x[i]));
    poison += 0.f * x[i];
  }
  std::memset(q, 0, kInt8Block);
  if (!std::isfinite(poison) || amax == 0.f) {
    *s = poison;  // NaN, or 0 for an all-zero block
    return 0;
  }
  const float inv = 127.f / amax;
  int32_t sum = 0;
  for (int64_t i = 0; i < len; ++i) {
    q[i] = static_cast<int8_t>(std::clamp(std::nearbyint(x[i] * inv), -127.f, 127.f));
    sum += q[i];
  }
  *s = amax / 127.f;
  return sum;
}

// dst[0:n] = to_bf16(x[0:n]), then zeros up to dst[len] (vectorised: the scalar pair loop this replaced took ~0.9 ns
// a value, ~5% of a 1,000-token bf16 prefill)
__attribute__((target_clones("avx512f", "avx2", "default"))) void round_to_bf16(const float* x, uint16_t* dst,
                                                                                int64_t n, int64_t len) {
  for (int64_t k = 0; k < n; ++k) dst[k] = to_bf16(x[k]);
  for (int64_t k = n; k < len; ++k) dst[k] = 0;
}

// dst[0:n] = float(to_bf16(x[0:n])), then zeros up to dst[len]
__attribute__((target_clones("avx512f", "avx2", "default"))) void round_through_bf16(const float* x, float* dst,
                                                                                    int64_t n, int64_t len) {
  for (int64_t k = 0; k < n; ++k) dst[k] = std::bit_cast<float>(uint32_t(to_bf16(x[k])) << 16);
  for (int64_t k = n; k < len; ++k) dst[k] = 0.f;
}

// dst[0:n] = float(fp16(x[0:n])) (IEEE half, rounded to nearest even as torch's x.half(): overflow to inf, NaN
// kept), then zeros up to dst[len]; F16C where the CPU has it, 8 values an instruction
__attribute__((target("avx2,f16c"))) void round_through_f16_f16c(const float* x, float* dst, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + k), _MM_FROUND_TO_NEAREST_INT)));
  for (; k < n; ++k) dst[k] = static_cast<float>(c10::Half(x[k]));
}

void round_through_f16(const float* x, float* dst, int64_t n, int64_t len) {
  static const bool f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  if (f16c)
    round_through_f16_f16c(x, dst, n);
  else
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<float>(c10::Half(x[k]));
  std::fill(dst + n, dst + len, 0.f);
}

// One activation row as the kernel wants it (linear.h PreparedX), into dst (ld elements of the kernel's
// type, zero-padded), sx and (int4) offset. Returns the int8 epilogue's shift, 128 * sum_k xd[k] (0 for other
// weights). avx512: full int8 blocks are quantised by quantize_block_avx512 (the same numbers).
float prepare_row(WeightType t, bool dot, bool avx512, const float* x, int64_t K, int64_t ld, void* dst, float* sx,
                  int32_t* offset) {
  if (t == WeightType::bf16) {  // pairs (k, k+1) as 32-bit groups are the bf16 values in order (little-endian)
    if (dot)
      round_to_bf16(x, static_cast<uint16_t*>(dst), K, 2 * ld);
    else
      round_through_bf16(x, static_cast<float*>(dst), K, ld);
    return 0.f;
  }
  if (t == WeightType::f16) {
    round_through_f16(x, static_cast<float*>(dst), K, ld);
    return 0.f;
  }
  auto* xf = static_cast<float*>(dst);
  float shift = 0.f;  // int8
  for (int64_t b = 0; b * kInt8Block < K; ++b) {  // int8 and int4
    const int64_t k0 = b * kInt8Block, len = std::min(kInt8Block, K - k0);
    alignas(64) int8_t q[kInt8Block];
    const int32_t qsum = avx512 && len == kInt8Block ? quantize_block_avx512(x + k0, q, &sx[b])
                                                     : quantize_block(x + k0, len, q, &sx[b]);
    if (dot)
      std::memcpy(static_cast<int8_t*>(dst) + k0, q, kInt8Block);
    else
      for (int64_t i = 0; i < kInt8Block; ++i) xf[k0 + i] = q[i] * sx[b];
    shift += sx[b] * static_cast<float>(qsum);
    if (t == WeightType::int4) offset[b] = 8 * qsum;  // what u = q + 8 adds to the block's sum
  }
  return 128.f * shift;
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

// y[i] = act((y[i] - shift) * scale[i] + bias[i]), then residual[i] += y[i], for one output row's span;
// scale, bias and residual may be null.
__attribute__((target_clones("avx512f", "avx2", "default"))) void epilogue(float* y, int64_t count,
                                                                           const float* scale, float shift,
                                                                           const float* bias, int64_t act,
                                                                           float* residual) {
  if (scale)
    for (int64_t i = 0; i < count; ++i) y[i] = (y[i] - shift) * scale[i];
  if (bias)
    for (int64_t i = 0; i < count; ++i) y[i] += bias[i];
  if (act == kActGeluTanh)
    for (int64_t i = 0; i < count; ++i) y[i] = gelu_tanh(y[i]);
  if (act == kActRelu)
    for (int64_t i = 0; i < count; ++i) y[i] = y[i] < 0.f ? 0.f : y[i];  // NaN stays NaN, as torch.relu
  if (residual)
    for (int64_t i = 0; i < count; ++i) residual[i] += y[i];
}

WeightType weight_type(const torch::Tensor& w) {
  switch (w.scalar_type()) {
    case torch::kFloat32: return WeightType::f32;
    case torch::kFloat16: return WeightType::f16;
    case torch::kBFloat16: return WeightType::bf16;
    case torch::kInt8: return WeightType::int8;
    case torch::kUInt8: return WeightType::int4;  // nibble pairs (aigc_rt/format.py)
    default:
      AIGC_CHECK(false, "PackedLinear: weight dtype ", w.scalar_type(),
                 " is not supported (float32, float16, bfloat16, int8, uint8 int4 nibble pairs)");
  }
  return WeightType::f32;
}

WeightType packed_type(const PackedLinear& lin) {
  const auto dtype = lin.weight.scalar_type();
  return lin.int4                      ? WeightType::int4
         : dtype == torch::kFloat32  ? WeightType::f32
         : dtype == torch::kFloat16  ? WeightType::f16
         : dtype == torch::kBFloat16 ? WeightType::bf16
                                     : WeightType::int8;
}

void check_vector(const c10::optional<torch::Tensor>& t, const char* name, int64_t O) {
  if (!t) return;
  AIGC_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == torch::kFloat32,
             "PackedLinear: ", name, " must be a contiguous float32 CPU tensor, got ", t->scalar_type(), " on ",
             t->device());
  AIGC_CHECK(t->dim() == 1 && t->size(0) == O, "PackedLinear: ", name, " has shape ", t->sizes(), ", expected [",
             O, "]");
}

// packed[panel][k / G][row % 16][k % G] = value(row, k) (linear.h), for rows < O_pad, k < K_pad
template <class T, int64_t G, class Value>
torch::Tensor pack_panels(int64_t O, int64_t K_pad, torch::ScalarType dtype, Value value) {
  const int64_t panels = (O + kPanel - 1) / kPanel, groups = K_pad / G;
  auto packed = torch::empty({panels, groups * kPanel * G}, dtype);
  T* dst = static_cast<T*>(packed.data_ptr());
#pragma omp parallel for schedule(static)
  for (int64_t panel = 0; panel < panels; ++panel)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t lane = 0; lane < kPanel; ++lane)
        for (int64_t j = 0; j < G; ++j)
          dst[((panel * groups + g) * kPanel + lane) * G + j] = value(panel * kPanel + lane, g * G + j);
  return packed;
}

}  // namespace

PackedLinear::PackedLinear(const torch::Tensor& w, const c10::optional<torch::Tensor>& bias_,
                           const c10::optional<torch::Tensor>& scale_)
    : bias(bias_), scale(scale_) {
  AIGC_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 2 && w.size(0) > 0 && w.size(1) > 0,
             "PackedLinear: weight must be a non-empty contiguous 2-D (out, in) CPU tensor, got shape ", w.sizes(),
             " on ", w.device());
  const WeightType t = weight_type(w);
  int4 = t == WeightType::int4;
  out_features = w.size(0);
  in_features = int4 ? 2 * w.size(1) : w.size(1);
  AIGC_CHECK((t == WeightType::int8 || int4) == scale.has_value(),
             "PackedLinear: a scale is required for int8 and int4 weights and only for them");
  if (!int4) check_vector(scale, "scale", out_features);
  check_vector(bias, "bias", out_features);
  const int64_t O = out_features, K = in_features, K_pad = packed_k(t, K);
  if (t == WeightType::f32) {
    const float* src = w.data_ptr<float>();
    weight = pack_panels<float, 1>(O, K_pad, torch::kFloat32,
                                   [&](int64_t o, int64_t k) { return o < O && k < K ? src[o * K + k] : 0.f; });
  } else if (t == WeightType::f16) {  // the halves' bits
    const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
    weight = pack_panels<uint16_t, 1>(O, K_pad, torch::kFloat16, [&](int64_t o, int64_t k) {
      return o < O && k < K ? src[o * K + k] : uint16_t(0);
    });
  } else if (t == WeightType::bf16) {
    const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
    weight = pack_panels<uint16_t, 2>(O, K_pad, torch::kBFloat16, [&](int64_t o, int64_t k) {
      return o < O && k < K ? src[o * K + k] : uint16_t(0);
    });
  } else if (int4) {
    const int64_t blocks = K_pad / kInt8Block, panels = (O + kPanel - 1) / kPanel, cols = K / 2;
    AIGC_CHECK(scale->device().is_cpu() && scale->is_contiguous() && scale->scalar_type() == torch::kFloat32 &&
                   scale->dim() == 2 && scale->size(0) == O && scale->size(1) == blocks,
               "PackedLinear: int4 weights (", O, ", ", cols, ") need contiguous float32 CPU scales (", O, ", ", blocks,
               "), one per row and block of 64 inputs; got ", scale->scalar_type(), " ", scale->sizes());
    const uint8_t* src = w.data_ptr<uint8_t>();
    const float* ws = scale->data_ptr<float>();
    auto u = [&](int64_t o, int64_t k) { return o < O && k < K ? (src[o * cols + k / 2] >> (4 * (k % 2))) & 15 : 8; };
    weight = torch::empty({panels, blocks * kInt4BlockBytes}, torch::kUInt8);
    uint8_t* dst = weight.data_ptr<uint8_t>();
#pragma omp parallel for schedule(static)
    for (int64_t panel = 0; panel < panels; ++panel)
      for (int64_t b = 0; b < blocks; ++b) {
        uint8_t* block = dst + (panel * blocks + b) * kInt4BlockBytes;
        for (int64_t lane = 0; lane < kPanel; ++lane) {
          const int64_t o = panel * kPanel + lane;
          for (int64_t i = 0; i < 8; ++i)
            for (int64_t j = 0; j < 4; ++j) {
              const int64_t k = b * kInt8Block + 4 * i + j;
              block[(i * kPanel + lane) * 4 + j] = static_cast<uint8_t>(u(o, k) | u(o, k + 32) << 4);
            }
          reinterpret_cast<float*>(block + kInt4Nibbles)[lane] = o < O ? ws[o * blocks + b] : 0.f;
        }
      }
    scale.reset();  // packed with the weight
  } else {
    const int8_t* src = w.data_ptr<int8_t>();
    // symmetric int8: q in [-127, 127] (the AVX2 kernel negates q, and -128 has no positive twin)
    AIGC_CHECK(*std::min_element(src, src + O * K) > -128, "PackedLinear: int8 weights must lie in [-127, 127] "
               "(symmetric quantisation), found -128");
    weight = pack_panels<uint8_t, 4>(O, K_pad, torch::kUInt8, [&](int64_t o, int64_t k) {
      return static_cast<uint8_t>((o < O && k < K ? src[o * K + k] : 0) + 128);
    });
  }
}

std::string PackedLinear::dtype() const {
  const WeightType t = packed_type(*this);
  return kTypeNames[static_cast<int>(t)];
}

torch::Tensor linear(const torch::Tensor& x, const PackedLinear& lin, int64_t act,
                     const c10::optional<torch::Tensor>& out, const c10::optional<torch::Tensor>& residual) {
  AIGC_CHECK_CPU_CONTIGUOUS(x, torch::kFloat32);
  AIGC_CHECK(act == kActNone || act == kActGeluTanh || act == kActRelu, "linear: unknown activation code ", act,
             " (0 none, 1 GELU-tanh, 2 ReLU)");
  AIGC_CHECK(x.dim() >= 1 && x.size(-1) == lin.in_features, "linear: x ", x.sizes(), " does not have ",
             lin.in_features, " input features");
  const WeightType t = packed_type(lin);
  const int64_t K = lin.in_features, O = lin.out_features, N = x.numel() / K;
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
  float* res = nullptr;
  if (residual) {
    AIGC_CHECK_CPU_CONTIGUOUS(*residual, torch::kFloat32);
    AIGC_CHECK(residual->sizes() == c10::IntArrayRef(out_sizes), "linear: residual has shape ", residual->sizes(),
               ", expected ", c10::IntArrayRef(out_sizes));
    AIGC_CHECK(!overlap(*residual, x) && !overlap(*residual, y), "linear: residual must not overlap x or out");
    res = residual->data_ptr<float>();
  }
  if (N == 0) return y;

  const LinearIsa isa = pick_isa(t);
  const MicroKernel kernel = kernel_for(isa, t);
  // activations as 32-bit groups (xg): bf16 pairs for vdpbf16ps / AMX, int8 quads for every SIMD int8 kernel and
  // every int4 kernel
  const bool dot = t == WeightType::bf16   ? isa >= LinearIsa::avx512
                   : t == WeightType::int8 ? isa >= LinearIsa::avx2
                                           : t == WeightType::int4;
  const bool signed_int8 =  // sums q * xd: no shift to remove
      t == WeightType::int8 && (isa == LinearIsa::avx2 || isa == LinearIsa::avx512f);
  const int64_t K_pad = packed_k(t, K), G = group_size(t), blocks = round_up(K, kInt8Block) / kInt8Block;
  // prepared activations in the scratch buffer: (N, ld) elements, then (N, blocks) scales, then (N, blocks) int4
  // offsets, then (N,) shifts
  const int64_t ld = t == WeightType::f32 ? K : dot ? K_pad / G : K_pad;
  const size_t x_bytes = t == WeightType::f32 ? 0 : round_up(N * ld * 4, 64);
  const size_t sx_bytes = round_up(N * blocks * 4, 64);
  auto* buf = static_cast<std::byte*>(scratch(x_bytes + 2 * sx_bytes + N * 4));
  float* sx = reinterpret_cast<float*>(buf + x_bytes);
  int32_t* offset = reinterpret_cast<int32_t*>(buf + x_bytes + sx_bytes);
  float* shift = reinterpret_cast<float*>(buf + x_bytes + 2 * sx_bytes);

  Problem p{};
  p.x.ld = ld;
  p.x.blocks = blocks;
  p.x.xf = t == WeightType::f32 ? x.data_ptr<float>() : reinterpret_cast<const float*>(buf);
  p.x.xg = reinterpret_cast<const uint32_t*>(buf);
  p.x.sx = sx;
  p.x.offset = offset;
  p.w = lin.weight.data_ptr();
  p.groups = t == WeightType::int4 ? blocks * kInt4Lines : K_pad / G;  // int4: 64-byte lines
  p.K = K;
  p.O = O;
  p.y = y.data_ptr<float>();
  p.ldy = O;
  const float* xf = x.data_ptr<float>();
  const float* scale = lin.scale ? lin.scale->data_ptr<float>() : nullptr;
  const float* bias = lin.bias ? lin.bias->data_ptr<float>() : nullptr;

  const int64_t panels = (O + kPanel - 1) / kPanel;
  // activation rows per block: the block's prepared rows stay in L2 while the thread's panels stream past
  const int64_t n_block = std::max<int64_t>(8, (512 * 1024 / (ld * 4)) / 8 * 8);
#pragma omp parallel if (N * O * K >= (1 << 16))
  {
    if (t != WeightType::f32) {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n)
        shift[n] = prepare_row(t, dot, isa >= LinearIsa::avx512f, xf + n * K, K, ld, buf + n * ld * 4, sx + n * blocks,
                               offset + n * blocks);
    }
    // each thread: a contiguous run of panels
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const int64_t p0 = panels * thread / threads, p1 = panels * (thread + 1) / threads;
    const int64_t o0 = std::min(O, p0 * kPanel), o1 = std::min(O, p1 * kPanel);
    for (int64_t n0 = 0; n0 < N && p0 < p1; n0 += n_block) {
      const int64_t n1 = std::min(N, n0 + n_block);
      kernel(p, n0, n1, p0, p1);
      if (scale || bias || act != kActNone || res)
        for (int64_t n = n0; n < n1; ++n)
          epilogue(p.y + n * O + o0, o1 - o0, scale ? scale + o0 : nullptr, scale && !signed_int8 ? shift[n] : 0.f,
                   bias ? bias + o0 : nullptr, act, res ? res + n * O + o0 : nullptr);
    }
  }
  return y;
}

std::string linear_isa(const std::string& weight_dtype) {
  for (int i = 0; i < kTypes; ++i)
    if (weight_dtype == kTypeNames[i]) return kIsaNames[static_cast<int>(pick_isa(static_cast<WeightType>(i)))];
  AIGC_CHECK(false, "linear_isa: unknown weight dtype '", weight_dtype, "' (fp32, bf16, int8, int4, fp16)");
  return "";
}

void set_linear_isa(const std::string& cap) {
  for (int i = 0; i < kIsas; ++i)
    if (cap == kIsaNames[i]) {
      g_isa_cap = static_cast<LinearIsa>(i);
      return;
    }
  AIGC_CHECK(cap == "auto", "set_linear_isa: unknown ISA '", cap, "' (auto, amx, avx512, avx512f, avx2, scalar)");
  g_isa_cap = LinearIsa::amx;
}

}  // namespace aigc_rt::cpu
