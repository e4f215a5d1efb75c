// Decode GEMV with the epilogues of kernels/linear.py, for a decode step's few rows of activations:
//
//     y[m, n] (+)= act(s[n] * sum_k W[n, k] * xr[m, k] + b[n]),   m < M <= 8 (the step's rows), n < N
//
//     xr = round(x[m]) or round(LayerNorm(x[m]))   LayerNorm: (x - mean) / sqrt(var + eps) * g + beta, biased
//                                                  variance; round: to W's dtype for bf16 / fp16 weights (as the
//                                                  torch reference runs F.linear(x.to(w.dtype), w)), none for
//                                                  fp32 and int8 weights
//     W (N, K) fp32 | bf16 | fp16 | int8, s (N,) fp32 the int8 rows' scales (else 1), b (N,) fp32 or 0,
//     act = identity | GELU-tanh | ReLU (NaN kept, as torch.relu), (+)= stores, or adds into y (the residual stream)
//
// Products and sums are fp32. A block owns warps x ROWS output features for all M rows, so W is streamed once
// whatever M: the block stages xr in shared memory, a chunk of kc columns of every row at a time (all of K when
// it fits in 48 KiB; LayerNorm statistics first, in one pass over each row), and each warp streams its ROWS rows
// of W, each lane reading 16 bytes of every row per step (VEC: rows 16-byte aligned; else one element) and
// multiplying them with the M staged rows, so a warp has ROWS x the unrolled steps' 16-byte loads in flight. The
// warp's ROWS x M sums are reduced in one reduce-scatter (31 shuffles for 32 sums). Optionally (Hopper) each warp
// first asks L2 for its rows, so that they stream in while the rows are staged (and, under programmatic
// dependent launch, while the kernel before finishes).
//
// Called by aigc_rt/cuda_kernels.py (ctypes); tested by tests/test_cuda_kernels.py against the fp32 reference,
// on the CPU through emulate.h and on a GPU as built by setup.py; benchmarked by bench/gpu_profile.py.
#include "cuda/common.cuh"

namespace aigc_rt::cuda {

// The argument struct of aigc_gemv (mirrored by aigc_rt/cuda_kernels.py's GemvArgs: keep the two in step).
struct GemvArgs {
  const float* x;      // (M, K), rows x_stride apart
  const void* w;       // (N, K) of `dtype`, rows w_stride apart
  const float* scale;  // (N,) or null: int8 weights' per-row scales
  const float* bias;   // (N,) or null
  const float* ln_w;   // (K,) or null: LayerNorm of x's rows first, with ln_b (K,) and eps
  const float* ln_b;
  float* y;            // (M, N), rows y_stride apart
  int64_t M, N, K, x_stride, w_stride, y_stride;
  int64_t kc;          // columns staged at a time (set by aigc_gemv)
  float eps;
  int32_t dtype;          // Dtype
  int32_t act;            // kActNone, kActGeluTanh or kActRelu
  int32_t accumulate;     // 1: y += result
  int32_t rows_per_warp;  // 1, 2 or 4 (0: 2)
  int32_t warps;          // warps per block, 1 to 8 (0: 4)
  int32_t pdl;            // 1: a programmatic dependent launch (sm_90+)
  int32_t prefetch;       // 1: each warp first asks L2 for its rows of W (sm_90+; rows 16-byte aligned)
};

constexpr int32_t kActNone = 0, kActGeluTanh = 1, kActRelu = 2;  // GemvArgs::act (cuda_kernels.py ACT_CODES)
constexpr int kMaxRows = 8;  // M, the rows of activations one launch takes
// The staged chunk (M x kc x its element size, dynamic shared memory) at most: with the static shared memory of
// block_moments (<= 3 KiB) it stays within the 48 KiB a launch gets without opting in (tests/test_cuda_kernels.py
// checks the sum for every kernel of the build)
constexpr int64_t kMaxSharedBytes = 44 * 1024;
static_assert(kMaxSharedBytes / (kMaxRows * 4) >= 32 * 16, "a chunk holds at least one warp step of any dtype");

template <typename W> struct Staged { using type = float; };  // fp32 and int8 weights: x kept in fp32
template <> struct Staged<__nv_bfloat16> { using type = __nv_bfloat16; };
template <> struct Staged<__half> { using type = __half; };

// The warp-wide sums of N values per lane (N a power of two <= 32), in one reduce-scatter: at each of the first
// log2(N) steps a lane keeps half of its values and sends its partner the other half, adding what it receives;
// the rest are plain butterfly steps. Lane l ends with the sum of value l / (32 / N) (31 + 5 - log2(N) shuffles
// instead of 5 N).
template <int N>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[N], int lane) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N: a power of two up to 32");
#pragma unroll
  for (int step = 0; step < 5; ++step) {
    const int offset = 16 >> step, half = (N >> step) / 2;  // half of the values still live: 0 once one is
    if (half > 0) {
      const bool upper = (lane & offset) != 0;
#pragma unroll
      for (int j = 0; j < N / 2; ++j) {
        if (j < half) {
          const float send = upper ? v[j] : v[j + half];
          const float keep = upper ? v[j + half] : v[j];
          v[j] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
        }
      }
    } else {
      v[0] += __shfl_xor_sync(0xffffffffu, v[0], offset);
    }
  }
  return v[0];
}

// A thread's loads of activations are issued kInFlight at a time (over the M rows, kInFlight / MAXM columns of
// each) before any is used: a loop that used each value as it came would wait for L2 once per element.
constexpr int kInFlight = 16;

// Each row's LayerNorm statistics over its K columns, in one pass (every thread's share by Welford, combined
// over the block); rows >= M get (0, 1 / sqrt(eps))
template <int MAXM>
__device__ void row_statistics(const GemvArgs& a, float (&mean)[MAXM], float (&rstd)[MAXM]) {
  constexpr int P = kInFlight / MAXM;  // columns per row per round of loads
  Moments moments[MAXM];
  for (int64_t base = threadIdx.x; base < a.K; base += P * blockDim.x) {
    float v[MAXM][P];
#pragma unroll
    for (int m = 0; m < MAXM; ++m)
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int64_t k = base + p * blockDim.x;
        v[m][p] = m < a.M && k < a.K ? a.x[m * a.x_stride + k] : 0.0f;
      }
#pragma unroll
    for (int m = 0; m < MAXM; ++m)
#pragma unroll
      for (int p = 0; p < P; ++p)
        if (m < a.M && base + p * blockDim.x < a.K) moments[m].add(v[m][p]);
  }
  block_moments(moments);
#pragma unroll
  for (int m = 0; m < MAXM; ++m) {
    mean[m] = moments[m].mean;
    rstd[m] = 1.0f / sqrtf(moments[m].m2 / static_cast<float>(a.K) + a.eps);
  }
}

// Columns [k0, k0 + count) of the M rows of xr into xs (M, kc): x, or LayerNorm(x) by the rows' statistics
// (its weight and bias loaded once for all rows); rounded to X
template <typename X, int MAXM>
__device__ void stage_chunk(const GemvArgs& a, int64_t k0, int64_t count, const float (&mean)[MAXM],
                            const float (&rstd)[MAXM], X* xs) {
  constexpr int P = kInFlight / MAXM;
  const bool norm = a.ln_w != nullptr;
  for (int64_t base = threadIdx.x; base < count; base += P * blockDim.x) {
    float v[MAXM][P], g[P], beta[P];
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t i = base + p * blockDim.x;
      g[p] = norm && i < count ? a.ln_w[k0 + i] : 1.0f;
      beta[p] = norm && i < count ? a.ln_b[k0 + i] : 0.0f;
#pragma unroll
      for (int m = 0; m < MAXM; ++m) v[m][p] = m < a.M && i < count ? a.x[m * a.x_stride + k0 + i] : 0.0f;
    }
#pragma unroll
    for (int m = 0; m < MAXM; ++m)
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int64_t i = base + p * blockDim.x;
        if (m < a.M && i < count)
          xs[m * a.kc + i] = round_to<X>(norm ? (v[m][p] - mean[m]) * rstd[m] * g[p] + beta[p] : v[m][p]);
      }
  }
}

template <typename W, int ROWS, int MAXM, bool VEC>
__global__ void gemv_kernel(const GemvArgs a) {
  using X = typename Staged<W>::type;
  constexpr int V = VEC ? 16 / static_cast<int>(sizeof(W)) : 1;  // weights per lane per step
  AIGC_DYNAMIC_SHARED(X, xs);                                      // (M, kc) the staged chunk
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + warp) * ROWS;
  const bool active = n0 < a.N;  // whole warps; the others only help stage and meet the barriers
  if (VEC && a.prefetch && lane < ROWS && n0 + lane < a.N)  // before the wait: no kernel writes weights
    prefetch_l2(static_cast<const W*>(a.w) + (n0 + lane) * a.w_stride, static_cast<uint32_t>(a.K * sizeof(W)));
  if (a.pdl) pdl_begin();

  float mean[MAXM] = {}, rstd[MAXM];
#pragma unroll
  for (int m = 0; m < MAXM; ++m) rstd[m] = 1.0f;
  if (a.ln_w != nullptr) row_statistics<MAXM>(a, mean, rstd);

  const W* rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)  // rows past N read row n0 again, and are not stored
    rows[r] = static_cast<const W*>(a.w) + (n0 + r < a.N ? n0 + r : n0) * a.w_stride;
  float acc[ROWS * MAXM] = {};  // [r * MAXM + m]
  for (int64_t k0 = 0; k0 < a.K; k0 += a.kc) {
    const int64_t count = a.K - k0 < a.kc ? a.K - k0 : a.kc;
    if (k0 > 0) __syncthreads();  // the chunk before is consumed
    stage_chunk<X, MAXM>(a, k0, count, mean, rstd, xs);
    __syncthreads();
    if (!active) continue;
#pragma unroll(MAXM == 1 ? 4 : 2)
    for (int64_t i = static_cast<int64_t>(lane) * V; i < count; i += 32 * V) {
      float wv[ROWS][V];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) load_floats<W, V, true>(rows[r] + k0 + i, wv[r]);
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        if (m >= a.M) continue;
        float xv[V];
        load_floats<X, V, false>(xs + m * a.kc + i, xv);
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
          for (int j = 0; j < V; ++j) acc[r * MAXM + m] += wv[r][j] * xv[j];
      }
    }
  }
  if (!active) return;
  const float total = warp_reduce_scatter<ROWS * MAXM>(acc, lane);
  constexpr int kLanesPerSum = 32 / (ROWS * MAXM);
  const int value = lane / kLanesPerSum, r = value / MAXM, m = value % MAXM;
  const int64_t n = n0 + r;
  if (lane % kLanesPerSum == 0 && m < a.M && n < a.N) {
    float v = total;
    if (a.scale != nullptr) v *= a.scale[n];
    if (a.bias != nullptr) v += a.bias[n];
    if (a.act == kActGeluTanh) v = gelu_tanh(v);
    if (a.act == kActRelu) v = v < 0.f ? 0.f : v;
    float* out = a.y + m * a.y_stride + n;
    *out = a.accumulate ? *out + v : v;
  }
}

template <typename W, int ROWS, int MAXM>
int32_t launch_config(const GemvArgs& a, cudaStream_t stream) {
  const int warps = a.warps ? a.warps : 4;
  const int64_t per_block = static_cast<int64_t>(warps) * ROWS;
  const dim3 grid(static_cast<unsigned>((a.N + per_block - 1) / per_block));
  const size_t smem = static_cast<size_t>(a.M * a.kc) * sizeof(typename Staged<W>::type);
  constexpr int64_t V = 16 / sizeof(W);
  const bool vec = a.K % V == 0 && a.w_stride % V == 0 && reinterpret_cast<uintptr_t>(a.w) % 16 == 0;
  auto kernel = vec ? gemv_kernel<W, ROWS, MAXM, true> : gemv_kernel<W, ROWS, MAXM, false>;
  return static_cast<int32_t>(launch(kernel, grid, dim3(32 * warps), smem, stream, a.pdl != 0, a));
}

template <typename W, int ROWS>
int32_t launch_rows(const GemvArgs& a, cudaStream_t stream) {
  if (a.M == 1) return launch_config<W, ROWS, 1>(a, stream);
  if (a.M == 2) return launch_config<W, ROWS, 2>(a, stream);
  if (a.M <= 4) return launch_config<W, ROWS, 4>(a, stream);
  return launch_config<W, ROWS, 8>(a, stream);
}

template <typename W>
int32_t launch_dtype(GemvArgs a, cudaStream_t stream) {
  // columns staged at a time: all of K if the M rows fit in shared memory, else a multiple of a warp's step
  const int64_t step = 32 * (16 / static_cast<int64_t>(sizeof(W)));
  const int64_t fits = kMaxSharedBytes / (a.M * static_cast<int64_t>(sizeof(typename Staged<W>::type)));
  a.kc = a.K <= fits ? a.K : fits / step * step;
  switch (a.rows_per_warp) {
    case 0:
    case 2: return launch_rows<W, 2>(a, stream);
    case 1: return launch_rows<W, 1>(a, stream);
    case 4: return launch_rows<W, 4>(a, stream);
    default: return kBadConfig;
  }
}

}  // namespace aigc_rt::cuda

using aigc_rt::cuda::GemvArgs;

extern "C" {

// y (+)= act(s * W xr + b) for the M rows of x (the formula at the top); 0, a Status or a cudaError_t
int32_t aigc_gemv(const GemvArgs* a, void* stream) {
  using namespace aigc_rt::cuda;
  if (a->M < 1 || a->M > kMaxRows || a->N < 1 || a->K < 1) return kBadShape;
  if (a->warps < 0 || a->warps > 8 || a->act < kActNone || a->act > kActRelu) return kBadConfig;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (a->dtype) {
    case kF32: return launch_dtype<float>(*a, s);
    case kBF16: return launch_dtype<__nv_bfloat16>(*a, s);
    case kF16: return launch_dtype<__half>(*a, s);
    case kI8: return launch_dtype<int8_t>(*a, s);
    default: return kBadDtype;
  }
}

// sizeof(GemvArgs), which aigc_rt/cuda_kernels.py checks its mirror of the struct against
int64_t aigc_gemv_args_bytes() { return sizeof(GemvArgs); }

// the most rows of activations one aigc_gemv takes
int64_t aigc_gemv_max_rows() { return aigc_rt::cuda::kMaxRows; }

// the most dynamic shared memory an aigc_gemv launch asks for (bytes)
int64_t aigc_gemv_max_dynamic_shared() { return aigc_rt::cuda::kMaxSharedBytes; }

}  // extern "C"
