// AVX-512 micro-kernels of the convolutions, conv2d and conv_transpose: 16 floats per register, 32 registers,
// so tiles of 12 rows x 1-2 vectors, 8 x 3 and 6 x 4 (accumulators + the weight vectors + one broadcast <= 32).
// Compiled for AVX-512 by the pragma below whatever the build flags; conv.cpp calls it only where the CPU has
// AVX-512. Kernel: conv_tile.h. Tests: tests/test_cpu_conv.py.
#include <immintrin.h>

#include <cstdint>

#include "cpu/conv_isa.h"

#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,fma,avx2")
// GCC 12's own avx512fintrin.h trips -Wmaybe-uninitialized (its _mm512_undefined_ps placeholders)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "cpu/conv_v512.h"
#include "cpu/conv_tile.h"

namespace aigc_rt::cpu::conv {
const Isa kAvx512 = make_isa<V512, 12, 12, 8, 6>("avx512");
}
