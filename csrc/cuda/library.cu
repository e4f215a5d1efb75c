// What the Python side asks of the library as a whole: its error messages and whether it is the CPU emulation.
#include "cuda/common.cuh"

extern "C" {

const char* aigc_cuda_error_string(int32_t status) {
  using namespace aigc_rt::cuda;
  switch (status) {
    case kOk: return "no error";
    case kBadDtype: return "unsupported weight dtype";
    case kBadShape: return "bad shape";
    case kBadConfig: return "unsupported launch configuration";
    default: return cudaGetErrorString(static_cast<cudaError_t>(status));
  }
}

// 1 in the CPU emulation (emulate.h: the kernels take CPU pointers), 0 in the nvcc build (GPU pointers)
int32_t aigc_cuda_emulated() {
#ifdef AIGC_CUDA_EMULATION
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
