"""The `cpu` backend: C++ kernels from csrc/cpu (aigc_rt._C) where we have them, the torch reference for
the rest of the op set."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _C
from .torch_backend import TorchBackend, check_activation


@dataclass
class CpuLinear:
    """A linear layer in the layout csrc/cpu/linear.cpp streams: weight (out, in) fp32 or bf16 as in the
    file (fp16 widened to fp32 at load: there is no fp16 kernel), or int8 packed by _C.pack_int8 into
    uint8 rows of q + 128 padded to a multiple of 64, with its (out,) fp32 scale."""
    weight: torch.Tensor
    bias: torch.Tensor | None  # (out,) fp32
    scale: torch.Tensor | None  # (out,) fp32, int8 only


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, device: torch.device):
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs on the CPU, not on {device}")
        super().__init__(device)

    def prepare_linear(self, weight, bias, scale=None) -> CpuLinear:
        lin = super().prepare_linear(weight, bias, scale)  # checks; fp32 bias and scale
        w = lin.weight.contiguous()
        if w.dtype == torch.int8:
            w = _C.pack_int8(w)
        elif w.dtype == torch.float16:
            w = w.float()
        return CpuLinear(w, lin.bias, lin.scale)

    def linear(self, x, lin: CpuLinear, act=None, *, out=None):
        check_activation(act)
        return _C.linear(x.contiguous(), lin.weight, lin.bias, lin.scale, act == "gelu_tanh", out)

    def embedding(self, table, ids, *, scale=None, out=None):
        return _C.embedding(table, ids.contiguous(), scale, out)

    def layernorm(self, x, w, b, eps, *, out=None):
        return _C.layernorm(x.contiguous(), w, b, eps, out)

    def add_layernorm(self, x, residual, w, b, eps, *, out=None):
        return _C.add_layernorm(x.contiguous(), residual, w, b, eps, out)
