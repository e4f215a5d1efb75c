"""LayerNorm over the last dimension, for rows that are not normalised in a linear's prologue (a prefill's
ln_1 / ln_2, ln_f before the hidden states are returned). The residual add before each LayerNorm of GPT-2's
pre-norm blocks is fused, one step earlier, into the epilogue of the linear that produces the sub-layer's output
(linear.py `residual=`), and for decode rows the LayerNorm itself runs in the prologue of the linear after it
(linear.py `norm=`): a decode step launches no LayerNorm kernel at all.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias      (biased variance, over the last dim)

One program per row, the whole row in registers (C <= 16384), fp32 math. Test: tests/test_triton_kernels.py
(test_layernorm*); benchmark: bench/bench_triton.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import check_out, check_tensor, check_vector, pdl_begin, pdl_options, row_settings

MAX_C = 16384


@triton.jit
def _layernorm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, x_stride, y_stride, eps, BLOCK_C: tl.constexpr,
                      PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    in_row = cols < C
    x = tl.load(x_ptr + row * x_stride + cols, mask=in_row, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    centred = tl.where(in_row, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / C + eps)
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0)
    b = tl.load(b_ptr + cols, mask=in_row, other=0.0)
    tl.store(y_ptr + row * y_stride + cols, centred * rstd * w + b, mask=in_row)


def layernorm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, *, out=None) -> torch.Tensor:
    """x (..., C) fp32 -> LayerNorm(x) (..., C) fp32 (into `out` when given)."""
    check_tensor("x", x, None, (torch.float32,), None, last_contiguous=True)
    dev = x.device
    if x.dim() == 0 or x.shape[-1] == 0 or x.numel() == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if C > MAX_C:
        raise ValueError(f"layernorm supports rows of at most {MAX_C} elements, got {C}")
    check_vector("weight", w, C, (torch.float32,), dev)
    check_vector("bias", b, C, (torch.float32,), dev)
    if not (eps > 0):
        raise ValueError(f"eps must be > 0, got {eps}")
    x2 = x.reshape(-1, C)  # (R, C); a view whenever the rows are evenly strided
    y = check_out(out, tuple(x.shape), torch.float32, dev)
    block, num_warps = row_settings(C)
    _layernorm_kernel[(x2.shape[0],)](x2, w, b, y, C, x2.stride(0), C, float(eps), BLOCK_C=block,
                                      num_warps=num_warps, **pdl_options(dev))
    return y


def reference(x, w, b, eps):
    """Plain-PyTorch fp32 LayerNorm(x), over the last dimension."""
    return F.layer_norm(x.float(), (x.shape[-1],), w.float(), b.float(), eps)
