"""The `cpu` backend: C++ kernels from csrc/cpu (aigc_rt._C) where we have them, the torch reference for
the rest of the op set."""
from __future__ import annotations

import torch

from .. import _C
from .torch_backend import TorchBackend


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, device: torch.device):
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs on the CPU, not on {device}")
        super().__init__(device)

    def layernorm(self, x, w, b, eps):
        return _C.layernorm(x.contiguous(), w, b, eps)

    def add_layernorm(self, x, residual, w, b, eps):
        return _C.add_layernorm(x.contiguous(), residual, w, b, eps)

    def attention_prefill(self, q, k, v, *, out=None):
        # any strides with a contiguous last dim; a new output is laid out (B, T, H, D) in memory
        return _C.attention_prefill(q, k, v, out=out)

    def attention_decode(self, q, k_cache, v_cache, lengths, max_len, *, out=None):
        return _C.attention_decode(q, k_cache, v_cache, lengths, max_len, out=out)

    def sample(self, logits, params, u, seen, *, out=None):
        return _C.sample(logits, params.do_sample, params.temperature, params.top_k, params.top_p,
                         params.repetition_penalty, u, seen, out=out)
