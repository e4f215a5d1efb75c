"""The `cuda` backend: the triton backend with the CUDA kernels of csrc/cuda (aigc_rt/cuda_kernels.py) where
they exist, for now the decode GEMV: a decode step's linears of one row (with their LayerNorm prologue and
residual epilogue) run csrc/cuda/gemv.cu, its launch configuration timed per shape the first time (outside the
graph capture: the step runs eagerly first); everything else, and the CUDA-graph replay of the step, is the
triton backend's. `auto` still picks `triton` on a GPU until bench/gpu_decode.py shows this one faster.
With the CPU emulation of the CUDA kernels (AIGC_RT_CUDA_LIB, built by tests/test_cuda_kernels.py) and
TRITON_INTERPRET=1 it runs whole models on CPU tensors, as the triton backend does, for tests."""
from __future__ import annotations

import torch

from .. import cuda_kernels
from .torch_backend import Linear
from .triton_backend import TritonBackend

GEMV_MAX_ROWS = 1  # the CUDA GEMV streams W once per row; more rows take the Triton GEMM, which streams it once


class CudaBackend(TritonBackend):
    name = "cuda"

    def __init__(self, device: torch.device):
        kernels = cuda_kernels.library()
        if kernels is None:
            raise ValueError("backend 'cuda' needs aigc_rt's CUDA kernels (aigc_rt/_cuda_kernels*.so, which setup.py "
                             "builds where nvcc is found; or AIGC_RT_CUDA_LIB naming a build)")
        if not kernels.device_ok(device):
            raise ValueError(f"backend 'cuda': {kernels} takes {'CPU' if kernels.emulated else 'CUDA'} tensors, "
                             f"not {device}")
        super().__init__(device)
        self.kernels = kernels
        self.tune = not kernels.emulated  # the GEMV's launch configuration timed per shape on a GPU

    def _gemv(self, x: torch.Tensor, lin: Linear) -> bool:
        return x.numel() // x.shape[-1] <= GEMV_MAX_ROWS and self.kernels.gemv_fits(lin.weight)

    def linear(self, x, lin: Linear, act=None, *, out=None, residual=None):
        if not self._gemv(x, lin):
            return super().linear(x, lin, act, out=out, residual=residual)
        return self.kernels.gemv(x, lin.weight, lin.bias, act, scale=lin.scale, residual=residual,
                                 out=out if residual is None else None, tune=self.tune)

    def layernorm_linear(self, x, ln_w, ln_b, eps, lin: Linear, act=None, *, norm_out=None, out=None):
        if not self._gemv(x, lin):
            return super().layernorm_linear(x, ln_w, ln_b, eps, lin, act, norm_out=norm_out, out=out)
        return self.kernels.gemv(x, lin.weight, lin.bias, act, scale=lin.scale, norm=(ln_w, ln_b, eps), out=out,
                                 tune=self.tune)
