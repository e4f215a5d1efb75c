// What every csrc/cuda kernel file includes: the element types, 16-byte loads, block statistics,
// programmatic dependent launch and L2 prefetch, and launch(), which is cudaLaunchKernelEx under nvcc and a launch
// on the CPU under emulate.h (the CPU build the tests use: `g++ -x c++ -include csrc/cuda/emulate.h`). Plain
// CUDA, no torch headers: the Python side (aigc_rt/cuda_kernels.py) calls each file's extern "C" launch function
// through ctypes with raw pointers and a cudaStream_t.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#define AIGC_DYNAMIC_SHARED(T, name)                     \
  extern __shared__ __align__(16) unsigned char aigc_smem_[]; \
  T* name = reinterpret_cast<T*>(aigc_smem_)
#define AIGC_LDG(p) __ldg(p)
#else
#ifndef AIGC_CUDA_EMULATION
#error "compile csrc/cuda with nvcc, or with g++ -include csrc/cuda/emulate.h (the CPU emulation)"
#endif
#define AIGC_LDG(p) (*(p))
#endif

namespace aigc_rt::cuda {

// the element types of a weight matrix: the `dtype` field of the argument structs (cuda_kernels.py DTYPES)
enum Dtype : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kI8 = 3 };

// Errors of our own, besides cudaError_t's (positive) values: a launch function returns 0, one of these, or the
// CUDA error of the launch.
enum Status : int32_t {
  kOk = 0,
  kBadDtype = -1,
  kBadShape = -2,
  kBadConfig = -3,    // a launch configuration the kernel was not built for
};

__host__ __device__ inline float to_float(float v) { return v; }
__host__ __device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__host__ __device__ inline float to_float(__half v) { return __half2float(v); }
__host__ __device__ inline float to_float(int8_t v) { return static_cast<float>(v); }

// x rounded to T (nearest even), as the torch reference rounds activations to a low-precision weight's dtype
template <typename T> __host__ __device__ inline T round_to(float v);
template <> __host__ __device__ inline float round_to<float>(float v) { return v; }
template <> __host__ __device__ inline __nv_bfloat16 round_to<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __host__ __device__ inline __half round_to<__half>(float v) { return __float2half_rn(v); }

// V elements of T at p as floats. When they span whole 16-byte pieces (p then 16-byte aligned), 16-byte loads:
// from global memory through the read-only path (GLOBAL: data no kernel of the launch writes), else from
// shared memory; otherwise V loads of one element (rows that are not 16-byte aligned).
template <typename T, int V, bool GLOBAL>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float (&out)[V]) {
  constexpr int kBytes = V * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    T vals[V];
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      const uint4* piece = reinterpret_cast<const uint4*>(p) + c;
      const uint4 bits = GLOBAL ? AIGC_LDG(piece) : *piece;
      memcpy(reinterpret_cast<unsigned char*>(vals) + 16 * c, &bits, 16);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = to_float(vals[j]);
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = to_float(GLOBAL ? AIGC_LDG(p + j) : p[j]);
  }
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch if pdl (sm_90+: the kernel
// may start before the one before it has finished; it calls pdl_begin() before it reads what that one wrote)
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl,
                   Args... args) {
#ifdef __CUDACC__
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, args...);
#else
  if (smem > 48 * 1024) return cudaErrorInvalidValue;  // as a GPU refuses it without an opt-in attribute
  aigc_emu::launch(grid, block, smem, [=] { kernel(args...); });
  return cudaSuccess;
#endif
}

// Under programmatic dependent launch: wait until the kernel before has finished and its writes are visible,
// then let the next kernel launch (it waits in turn). A no-op otherwise, before sm_90 and in the emulation.
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Ask L2 for `bytes` bytes from p (both multiples of 16) with one bulk prefetch (the copy engine fetches them;
// later loads hit L2 or join the request). sm_90+; a no-op before and in the emulation.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// Running statistics of a set of values (Welford): how many, their mean, and the sum of squared deviations from
// it. merge() combines two sets exactly as if one had seen both (Chan et al.), so threads and warps can each
// take a share of a row in one pass and combine at the end.
struct Moments {
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;

  __device__ __forceinline__ void add(float v) {
    n += 1.0f;
    const float d = v - mean;
    mean += d / n;
    m2 += d * (v - mean);
  }

  __device__ __forceinline__ void merge(const Moments& o) {
    const float total = n + o.n;
    if (total == 0.0f) return;
    const float d = o.mean - mean, share = o.n / total;
    mean += d * share;
    m2 += o.m2 + d * d * n * share;
    n = total;
  }
};

// The moments of every thread's values for each of N sets (rows), combined over the block in place: each warp's
// by a butterfly, then every thread merges the warps' in warp order, so that all threads get the same values,
// the same every run. blockDim.x a multiple of 32; every thread calls it.
template <int N>
__device__ __forceinline__ void block_moments(Moments (&m)[N]) {
  __shared__ float partial[32][N][3];  // (n, mean, m2) per warp and set (no constructors in shared memory)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      Moments other;
      other.n = __shfl_xor_sync(0xffffffffu, m[i].n, offset);
      other.mean = __shfl_xor_sync(0xffffffffu, m[i].mean, offset);
      other.m2 = __shfl_xor_sync(0xffffffffu, m[i].m2, offset);
      m[i].merge(other);
    }
  }
  __syncthreads();  // partial[] may still be read by an earlier call
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      partial[warp][i][0] = m[i].n;
      partial[warp][i][1] = m[i].mean;
      partial[warp][i][2] = m[i].m2;
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    m[i] = Moments{};
    for (int w = 0; w < warps; ++w) m[i].merge(Moments{partial[w][i][0], partial[w][i][1], partial[w][i][2]});
  }
}

__device__ __forceinline__ float gelu_tanh(float y) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * y * (1.0f + tanhf(k * (y + 0.044715f * y * y * y)));
}

}  // namespace aigc_rt::cuda
