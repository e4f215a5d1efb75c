"""The `cpu` backend: C++ kernels from csrc/cpu (aigc_rt._C) where we have them, the torch reference for
the rest of the op set."""
from __future__ import annotations

import torch

from .. import _C
from .torch_backend import TorchBackend, check_activation


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, device: torch.device):
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs on the CPU, not on {device}")
        super().__init__(device)

    def prepare_linear(self, weight, bias, scale=None) -> _C.PackedLinear:
        """The weight repacked once into the panel layout csrc/cpu/linear.cpp streams (fp16 is widened to
        fp32 here: there is no fp16 kernel)."""
        lin = super().prepare_linear(weight, bias, scale)  # checks; fp32 bias and scale
        w = lin.weight.float() if lin.weight.dtype == torch.float16 else lin.weight
        return _C.PackedLinear(w.contiguous(), lin.bias, lin.scale)

    def linear(self, x, lin: _C.PackedLinear, act=None, *, out=None):
        check_activation(act)
        return _C.linear(x.contiguous(), lin, act == "gelu_tanh", out)

    def embedding(self, table, ids, *, scale=None, out=None):
        return _C.embedding(table, ids.contiguous(), scale, out)

    def layernorm(self, x, w, b, eps, *, out=None):
        return _C.layernorm(x.contiguous(), w, b, eps, out)

    def add_layernorm(self, x, residual, w, b, eps, *, out=None):
        return _C.add_layernorm(x.contiguous(), residual, w, b, eps, out)

    def attention_prefill(self, q, k, v, *, out=None):
        # any strides with a contiguous last dim; a new output is laid out (B, T, H, D) in memory
        return _C.attention_prefill(q, k, v, out=out)

    def write_kv(self, k_cache, v_cache, positions, k, v):
        _C.write_kv(k_cache, v_cache, positions, k, v)

    def attention_decode(self, q, k_cache, v_cache, lengths, max_len, *, out=None):
        return _C.attention_decode(q, k_cache, v_cache, lengths, max_len, out=out)

    def sample(self, logits, params, u, seen, *, out=None):
        return _C.sample(logits, params.do_sample, params.temperature, params.top_k, params.top_p,
                         params.repetition_penalty, u, seen, out=out)

    # DCGAN: transposed convs on csrc/cpu/conv_transpose.cpp (activations stay channels_last between layers);
    # the discriminator's conv2d is the torch reference's.
    def prepare_conv_transpose(self, weight, bias, stride, padding, output_padding):
        return _C.conv_transpose_prepare(weight.float().contiguous(), bias.float().contiguous(), stride, padding,
                                         output_padding)

    def conv_transpose(self, x, layer, act):
        return _C.conv_transpose(x, layer, act)
