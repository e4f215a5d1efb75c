"""LayerNorm, optionally fused with the residual add that precedes it (GPT-2's pre-norm blocks).

    r   = residual + x                      (add_layernorm only; written back into `residual`)
    y   = (r - mean(r)) / sqrt(var(r) + eps) * weight + bias      (biased variance, over the last dim)

One program per row, the whole row in registers (C <= 16384), fp32 math. Test: tests/test_triton_kernels.py
(test_layernorm*); benchmark: bench/bench_triton.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import check_out, check_tensor, pdl_begin, pdl_options, row_settings

MAX_C = 16384


@triton.jit
def _layernorm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, C, x_stride, res_stride, y_stride, eps,
                      ADD_RESIDUAL: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    in_row = cols < C
    r = tl.load(x_ptr + row * x_stride + cols, mask=in_row, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        r += tl.load(res_ptr + row * res_stride + cols, mask=in_row, other=0.0)
        tl.store(res_ptr + row * res_stride + cols, r, mask=in_row)
    mean = tl.sum(r, axis=0) / C
    centred = tl.where(in_row, r - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / C + eps)
    w = tl.load(w_ptr + cols, mask=in_row, other=0.0)
    b = tl.load(b_ptr + cols, mask=in_row, other=0.0)
    tl.store(y_ptr + row * y_stride + cols, centred * rstd * w + b, mask=in_row)


def _launch(x, residual, w, b, eps, out):
    check_tensor("x", x, None, (torch.float32,), None, last_contiguous=True)
    dev = x.device
    if x.dim() == 0 or x.shape[-1] == 0 or x.numel() == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if C > MAX_C:
        raise ValueError(f"layernorm supports rows of at most {MAX_C} elements, got {C}")
    for name, p in (("weight", w), ("bias", b)):
        check_tensor(name, p, 1, (torch.float32,), dev)
        if p.shape[0] != C or not p.is_contiguous():
            raise ValueError(f"{name} must be a contiguous ({C},) tensor, got {tuple(p.shape)}")
    if not (eps > 0):
        raise ValueError(f"eps must be > 0, got {eps}")
    x2 = x.reshape(-1, C)  # (R, C); a view whenever the rows are evenly strided
    res2 = x2  # unused unless ADD_RESIDUAL
    if residual is not None:
        check_tensor("residual", residual, x.dim(), (torch.float32,), dev)
        if residual.shape != x.shape or not residual.is_contiguous():
            raise ValueError(f"residual must be contiguous with x's shape {tuple(x.shape)}, got "
                             f"{tuple(residual.shape)}")
        res2 = residual.view(-1, C)
    y = check_out(out, tuple(x.shape), torch.float32, dev)
    block, num_warps = row_settings(C)
    _layernorm_kernel[(x2.shape[0],)](x2, res2, w, b, y, C, x2.stride(0), res2.stride(0), C, float(eps),
                                      ADD_RESIDUAL=residual is not None, BLOCK_C=block, num_warps=num_warps,
                                      **pdl_options(dev))
    return y


def layernorm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, *, out=None) -> torch.Tensor:
    """x (..., C) fp32 -> LayerNorm(x) (..., C) fp32 (into `out` when given)."""
    return _launch(x, None, w, b, eps, out)


def add_layernorm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, *,
                  out=None) -> torch.Tensor:
    """residual += x (in place); returns LayerNorm(residual) (..., C) fp32 (into `out` when given)."""
    return _launch(x, residual, w, b, eps, out)


def reference(x, w, b, eps, residual=None):
    """Plain-PyTorch fp32: (LayerNorm(residual + x), residual + x), without touching the inputs."""
    r = x.float() if residual is None else residual.float() + x.float()
    return F.layer_norm(r, (r.shape[-1],), w.float(), b.float(), eps), r
