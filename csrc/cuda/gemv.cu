// Decode GEMV with the epilogues of kernels/linear.py, for a few rows of activations:
//
//     y[m, n] (+)= act(s[n] * sum_k W[n, k] * xr[m, k] + b[n]),   m < M (a decode step's rows), n < N
//
//     xr = round(x[m]) or round(LayerNorm(x[m]))   LayerNorm: (x - mean) / sqrt(var + eps) * g + beta, biased
//                                                  variance; round: to W's dtype for bf16 / fp16 weights (as the
//                                                  torch reference runs F.linear(x.to(w.dtype), w)), none for
//                                                  fp32 and int8 weights
//     W (N, K) fp32 | bf16 | fp16 | int8, s (N,) fp32 the int8 rows' scales (else 1), b (N,) fp32 or 0,
//     act = identity | GELU-tanh, (+)= stores, or adds into y (the residual stream)
//
// Products and sums are fp32. One block per (row m, group of warps x ROWS output features): the block stages
// xr in shared memory (normalising it first if asked: the statistics in one pass), then each warp streams ROWS
// rows of W, each lane reading 16 bytes of every row per step (VEC: rows 16-byte aligned; else one element), so
// a warp has ROWS x the unrolled steps' 16-byte loads in flight. A warp's sums are reduced by shuffles; lane r
// finishes row n0 + r. Optionally (Hopper) each warp first asks L2 for its rows, so that they stream in while
// the row is staged (and, under programmatic dependent launch, while the kernel before finishes).
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
  float eps;
  int32_t dtype;          // Dtype
  int32_t gelu;           // 1: GELU-tanh
  int32_t accumulate;     // 1: y += result
  int32_t rows_per_warp;  // 1, 2 or 4 (0: 2)
  int32_t warps;          // warps per block, 1 to 8 (0: 4)
  int32_t pdl;            // 1: a programmatic dependent launch (sm_90+)
  int32_t prefetch;       // 1: each warp first asks L2 for its rows of W (sm_90+; rows 16-byte aligned)
};

constexpr int64_t kMaxSharedBytes = 48 * 1024;  // the staged row: K x its element size

template <typename W> struct Staged { using type = float; };  // fp32 and int8 weights: x kept in fp32
template <> struct Staged<__nv_bfloat16> { using type = __nv_bfloat16; };
template <> struct Staged<__half> { using type = __half; };

// xr for row m into xs (K,): x, or LayerNorm(x) with the row's statistics from one pass (each thread's share by
// Welford, combined over the block), then the normalising pass re-reading x from L1; rounded to X
template <typename X>
__device__ void stage_row(const GemvArgs& a, const float* __restrict__ x, X* xs) {
  float mean = 0.0f, rstd = 1.0f;
  if (a.ln_w != nullptr) {
    Moments m;
    for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x) m.add(x[k]);
    m = block_moments(m);
    mean = m.mean;
    rstd = 1.0f / sqrtf(m.m2 / static_cast<float>(a.K) + a.eps);
  }
  for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x) {
    const float v = a.ln_w != nullptr ? (x[k] - mean) * rstd * a.ln_w[k] + a.ln_b[k] : x[k];
    xs[k] = round_to<X>(v);
  }
}

template <typename W, int ROWS, bool VEC>
__global__ void __launch_bounds__(256) gemv_kernel(const GemvArgs a) {
  using X = typename Staged<W>::type;
  constexpr int V = VEC ? 16 / static_cast<int>(sizeof(W)) : 1;  // weights per lane per step
  AIGC_DYNAMIC_SHARED(X, xs);                                      // (K,) the staged row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + warp) * ROWS;
  if (VEC && a.prefetch && lane < ROWS && n0 + lane < a.N)  // before the wait: no kernel writes weights
    prefetch_l2(static_cast<const W*>(a.w) + (n0 + lane) * a.w_stride, static_cast<uint32_t>(a.K * sizeof(W)));
  if (a.pdl) pdl_begin();
  const int64_t m = blockIdx.y;
  stage_row<X>(a, a.x + m * a.x_stride, xs);
  __syncthreads();
  if (n0 >= a.N) return;  // whole warps: no shuffle or barrier follows for them
  const W* rows[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)  // rows past N read row n0 again, and are not stored
    rows[r] = static_cast<const W*>(a.w) + (n0 + r < a.N ? n0 + r : n0) * a.w_stride;

  float acc[ROWS] = {};
#pragma unroll 4
  for (int64_t k = static_cast<int64_t>(lane) * V; k < a.K; k += 32 * V) {
    float xv[V];
    load_floats<X, V, false>(xs + k, xv);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float wv[V];
      load_floats<W, V, true>(rows[r] + k, wv);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[r] += wv[j] * xv[j];
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float total = warp_sum(acc[r]);
    const int64_t n = n0 + r;
    if (lane == r && n < a.N) {
      float v = total;
      if (a.scale != nullptr) v *= a.scale[n];
      if (a.bias != nullptr) v += a.bias[n];
      if (a.gelu) v = gelu_tanh(v);
      float* out = a.y + m * a.y_stride + n;
      *out = a.accumulate ? *out + v : v;
    }
  }
}

template <typename W, int ROWS>
int32_t launch_rows(const GemvArgs& a, cudaStream_t stream) {
  using X = typename Staged<W>::type;
  const int warps = a.warps ? a.warps : 4;
  const int64_t per_block = static_cast<int64_t>(warps) * ROWS;
  const dim3 grid(static_cast<unsigned>((a.N + per_block - 1) / per_block), static_cast<unsigned>(a.M));
  const size_t smem = static_cast<size_t>(a.K) * sizeof(X);
  constexpr int64_t V = 16 / sizeof(W);
  const bool vec = a.K % V == 0 && a.w_stride % V == 0 && reinterpret_cast<uintptr_t>(a.w) % 16 == 0;
  auto kernel = vec ? gemv_kernel<W, ROWS, true> : gemv_kernel<W, ROWS, false>;
  return static_cast<int32_t>(launch(kernel, grid, dim3(32 * warps), smem, stream, a.pdl != 0, a));
}

template <typename W>
int32_t launch_dtype(const GemvArgs& a, cudaStream_t stream) {
  using X = typename Staged<W>::type;
  if (a.K * static_cast<int64_t>(sizeof(X)) > kMaxSharedBytes) return kTooLong;
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
  if (a->M < 1 || a->M > 65535 || a->N < 1 || a->K < 1) return kBadShape;
  if (a->warps < 0 || a->warps > 8) return kBadConfig;
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

// the longest row aigc_gemv stages for weights of `dtype` (K * its staged element size <= 48 KiB), or 0
int64_t aigc_gemv_max_k(int32_t dtype) {
  using namespace aigc_rt::cuda;
  switch (dtype) {
    case kF32: case kI8: return kMaxSharedBytes / 4;
    case kBF16: case kF16: return kMaxSharedBytes / 2;
    default: return 0;
  }
}

}  // extern "C"
