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

    # DCGAN: transposed convs on csrc/cpu/conv_transpose.cpp (activations stay channels_last between layers);
    # the discriminator's conv2d is the torch reference's.
    def prepare_conv_transpose(self, weight, bias, stride, padding, output_padding):
        return _C.conv_transpose_prepare(weight.float().contiguous(), bias.float().contiguous(), stride, padding,
                                         output_padding)

    def conv_transpose(self, x, layer, act):
        return _C.conv_transpose(x, layer, act)
