// What every csrc/cuda kernel file includes: the element types, 16-byte loads, warp and block sums, and
// AIGC_LAUNCH, which is a <<<grid, block>>> launch under nvcc and a launch on CPU threads under emulate.h (the
// CPU build the tests use: `g++ -x c++ -include csrc/cuda/emulate.h`). Plain CUDA, no torch headers: the
// Python side (aigc_rt/cuda_kernels.py) calls each file's extern "C" launch function through ctypes with raw
// pointers and a cudaStream_t.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#define AIGC_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
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

// the element types of a weight matrix (the values of AigcDtype in the launch functions' argument structs)
enum Dtype : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kI8 = 3 };

// Errors of our own, besides cudaError_t's (positive) values: a launch function returns 0, one of these, or the
// CUDA error of the launch.
enum Status : int32_t {
  kOk = 0,
  kBadDtype = -1,
  kBadShape = -2,
  kTooLong = -3,      // a row longer than the kernel's shared memory holds
  kBadConfig = -4,    // a launch configuration the kernel was not built for
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

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The sum of v over the block (every thread gets it); blockDim.x a multiple of 32, every thread calls it.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // partial[] may still be read by an earlier call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : 0.0f;
  return warp_sum(v);
}

__device__ __forceinline__ float gelu_tanh(float y) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * y * (1.0f + tanhf(k * (y + 0.044715f * y * y * y)));
}

}  // namespace aigc_rt::cuda
