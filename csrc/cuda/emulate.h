// The CUDA execution model on the CPU, so that csrc/cuda kernels run in tests on a machine without a GPU (what
// TRITON_INTERPRET=1 is for the Triton kernels). A kernel file compiled with
//
//     g++ -std=c++20 -O1 -shared -fPIC -x c++ -include csrc/cuda/emulate.h -I<cuda>/include -Icsrc F.cu
//
// runs the blocks of a launch in turn, each CUDA thread of a block a fiber on the calling thread: __syncthreads
// is a barrier over the block, __shfl_xor_sync an exchange through the warp's slots around a barrier over the
// warp, a __shared__ variable a static (one block runs at a time) and the dynamic shared memory a buffer per
// launch. Index arithmetic, masking, reductions and epilogues run as written; a barrier that some threads never
// reach (a hang on a GPU) aborts with a message. What it cannot show is speed, a data race the barriers happen
// to hide, or anything in inline PTX (kernels keep that out of the emulated path). One launch at a time.
#pragma once

#define AIGC_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <ucontext.h>
#include <vector>

#undef __host__
#undef __device__
#undef __global__
#undef __shared__
#undef __launch_bounds__
#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __launch_bounds__(...)

// cudaStream_t, cudaError_t and cudaGetErrorString's declaration come with the headers above (cuda_runtime_api.h);
// the emulation defines it (weak: every kernel file includes this header)
extern "C" __attribute__((weak)) const char* cudaGetErrorString(cudaError_t) { return "no error (CPU emulation)"; }

inline uint3 threadIdx, blockIdx;  // of the running fiber
inline dim3 blockDim, gridDim;

namespace aigc_emu {

// Each CUDA thread of a block is a fiber (ucontext) on the calling OS thread; a fiber that waits at a barrier
// yields to the scheduler, which runs the block's fibers round-robin. (One OS thread per CUDA thread was 2.7x
// slower on an lm_head-sized GEMV: hundreds of threads on two cores meeting at every shuffle.)
constexpr std::size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<unsigned char[]> stack{new unsigned char[kStackBytes]};
  uint3 thread;
  bool done = false;
};

struct Barrier {
  unsigned count, arrived = 0;
  unsigned long phase = 0;
};

// A shuffle writes the lane's value into the slots of the barrier's phase parity, waits, reads its partner's: two
// sets of slots, since a lane can be at most one shuffle ahead of another (it waits at the next barrier for it)
struct Warp {
  Barrier sync;
  unsigned char slots[2][32][8];
};

inline ucontext_t scheduler;
inline Fiber* current;
inline unsigned long progress;  // arrivals at barriers and finished threads: a pass without any is a deadlock
inline Barrier* block_sync;
inline Warp* warp;
inline unsigned char* dynamic_smem;

inline void arrive_and_wait(Barrier& b) {
  const unsigned long phase = b.phase;
  ++progress;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.phase;
    return;
  }
  while (b.phase == phase) swapcontext(&current->context, &scheduler);  // let the others reach it
}

template <typename Body>
inline Body* running_body;

template <typename Body>
void fiber_main() {
  (*running_body<Body>)();
  current->done = true;
  ++progress;
}  // returns to uc_link: the scheduler

// body() once per thread of every block of the grid: the blocks in turn, each block's threads as fibers
template <typename Body>
void launch(dim3 grid, dim3 block, std::size_t smem, Body body) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y * block.z;
  std::vector<unsigned char> shared(smem + 16);
  dynamic_smem = shared.data() + (16 - reinterpret_cast<std::uintptr_t>(shared.data()) % 16) % 16;
  static std::vector<Fiber> fibers;  // kept between launches: their stacks are the costly part
  if (fibers.size() < threads) fibers.resize(threads);
  std::vector<Warp> warps((threads + 31) / 32);
  Barrier sync{threads};
  running_body<Body> = &body;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = uint3{bx, by, bz};
        block_sync = &sync;
        for (unsigned w = 0; w < warps.size(); ++w) warps[w].sync = Barrier{std::min(32u, threads - 32 * w)};
        for (unsigned t = 0; t < threads; ++t) {
          Fiber& f = fibers[t];
          f.thread = uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
          f.done = false;
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.get();
          f.context.uc_stack.ss_size = kStackBytes;
          f.context.uc_link = &scheduler;
          makecontext(&f.context, &fiber_main<Body>, 0);
        }
        for (unsigned running = threads; running > 0;) {
          const unsigned long before = progress;
          running = 0;
          for (unsigned t = 0; t < threads; ++t) {
            if (fibers[t].done) continue;
            current = &fibers[t];
            threadIdx = current->thread;
            warp = &warps[t / 32];
            swapcontext(&scheduler, &current->context);
            running += !fibers[t].done;
          }
          if (running > 0 && progress == before) {  // on a GPU: a hang
            std::fprintf(stderr, "emulate.h: block (%u, %u, %u): %u threads wait at a barrier that the others never "
                         "reach (a __syncthreads after some threads returned, or a shuffle by part of a warp)\n",
                         bx, by, bz, running);
            std::abort();
          }
        }
      }
}

inline unsigned lane() {
  return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % 32;
}

}  // namespace aigc_emu

inline void __syncthreads() { aigc_emu::arrive_and_wait(*aigc_emu::block_sync); }

// every lane of the warp must call it (the kernels here only shuffle with full warps)
template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int /*width*/ = 32) {
  static_assert(sizeof(T) <= 8, "__shfl_xor_sync: at most 8 bytes");
  aigc_emu::Warp& w = *aigc_emu::warp;
  const unsigned me = aigc_emu::lane();
  auto& slots = w.slots[w.sync.phase % 2];
  std::memcpy(slots[me], &v, sizeof(T));
  aigc_emu::arrive_and_wait(w.sync);
  T other;
  std::memcpy(&other, slots[me ^ static_cast<unsigned>(lane_mask)], sizeof(T));
  return other;
}

#define AIGC_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(aigc_emu::dynamic_smem)
