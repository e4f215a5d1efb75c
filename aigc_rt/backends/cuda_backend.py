"""The `cuda` backend: the triton backend with the CUDA kernels of csrc/cuda (aigc_rt/cuda_kernels.py) where
they exist, for now the decode GEMV: a decode step's linears (up to 8 rows, with their LayerNorm prologue and
residual epilogue) run csrc/cuda/gemv.cu or the Triton linear, whichever is faster for that shape: the first
time a shape comes, the GEMV's launch configurations and the Triton kernel (autotuned itself) are timed, and
the choice is kept (outside the graph capture: the step runs eagerly first). Everything else, and the
CUDA-graph replay of the step, is the triton backend's. `auto` still picks `triton` on a GPU until
bench/gpu_decode.py shows this one faster.
With the CPU emulation of the CUDA kernels (AIGC_RT_CUDA_LIB, built by tests/test_cuda_kernels.py) and
TRITON_INTERPRET=1 it runs whole models on CPU tensors, as the triton backend does, for tests; there nothing is
timed and every linear the GEMV takes runs it."""
from __future__ import annotations

import torch

from .. import cuda_kernels
from ..kernels import linear as triton_linear
from .torch_backend import Linear
from .triton_backend import TritonBackend


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
        self.tune = not kernels.emulated  # on a GPU: time the GEMV's configurations and the Triton linear
        self.choices: dict[tuple, bool] = {}  # linear shape and flags -> whether the CUDA GEMV is the faster

    def linear(self, x, lin: Linear, act=None, *, out=None, residual=None):
        out = out if residual is None else None  # with a residual, the result goes into it
        if self._gemv_runs(x, lin, act, None, out, residual):
            return self.kernels.gemv(x, lin.weight, lin.bias, act, scale=lin.scale, out=out, residual=residual,
                                     tune=self.tune)
        return super().linear(x, lin, act, out=out, residual=residual)

    def layernorm_linear(self, x, ln_w, ln_b, eps, lin: Linear, act=None, *, norm_out=None, out=None):
        norm = (ln_w, ln_b, eps)
        if self._gemv_runs(x, lin, act, norm, out, None):
            return self.kernels.gemv(x, lin.weight, lin.bias, act, scale=lin.scale, norm=norm, out=out,
                                     tune=self.tune)
        return super().layernorm_linear(x, ln_w, ln_b, eps, lin, act, norm_out=norm_out, out=out)

    def _gemv_runs(self, x, lin: Linear, act, norm, out, residual) -> bool:
        """Whether this linear runs on the CUDA GEMV: it takes it, and (when timing) it is the faster for the
        shape. The first time a shape comes, both are timed on these operands."""
        if not self.kernels.gemv_takes(x, lin.weight):
            return False
        if not self.tune:
            return True
        key = (x.numel() // x.shape[-1], *lin.weight.shape, lin.weight.dtype, norm is not None, act,
               lin.bias is not None, residual is not None)
        if key not in self.choices:
            def cuda():
                self.kernels.gemv(x, lin.weight, lin.bias, act, scale=lin.scale, norm=norm, out=out,
                                  residual=residual, tune=True)

            def triton():
                triton_linear.linear(x, lin.weight, lin.bias, act, scale=lin.scale, norm=norm, out=out,
                                     residual=residual)
            self.choices[key] = self.kernels.fastest({"cuda": cuda, "triton": triton}, residual) == "cuda"
        return self.choices[key]
