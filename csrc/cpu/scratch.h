// Grow-only per-thread scratch memory, so kernels take their working buffers without a heap allocation per
// call: the first call on each thread allocates, later calls reuse the block (growing it only for a larger
// problem). Separate slots let a caller hold one buffer while its OpenMP region (whose master thread is the
// caller's thread) uses another.
#pragma once
#include <cstddef>
#include <cstdlib>
#include <new>

namespace aigc_rt::cpu {

enum class ScratchSlot { host = 0, worker = 1, kCount = 2 };

// A 64-byte-aligned buffer of at least n floats, private to the calling thread and slot.
inline float* thread_scratch(ScratchSlot slot, size_t n) {
  struct Block {
    float* data = nullptr;
    size_t size = 0;
    ~Block() { std::free(data); }
  };
  thread_local Block blocks[static_cast<int>(ScratchSlot::kCount)];
  Block& b = blocks[static_cast<int>(slot)];
  if (n > b.size) {
    const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
    std::free(b.data);
    b.data = static_cast<float*>(std::aligned_alloc(64, bytes));
    b.size = b.data ? n : 0;
    if (!b.data) throw std::bad_alloc();
  }
  return b.data;
}

}  // namespace aigc_rt::cpu
