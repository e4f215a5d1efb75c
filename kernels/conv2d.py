"""Convolution with fused bias + activation, as an implicit GEMM in Triton (fp32, or bf16 weights): the DCGAN
discriminator's layers.

    out[n, co, oy, ox] = act(bias[co] + sum_{ci,ky,kx} x[n, ci, oy*s - p + ky, ox*s - p + kx] * w[co, ci, ky, kx])
    (x is zero outside the image); H_out = (H + 2p - k) // s + 1 (likewise W_out);
    act: "none", "relu", "tanh", "leaky_relu" (negative slope `slope`, a runtime float) or "sigmoid"
    (utils.CONV_ACTS; the discriminator's are leaky_relu and sigmoid).

Program axes 0 and 1 tile the GEMM: M = N x H_out x W_out output pixels (BLOCK_M), N = C_out (BLOCK_N),
K = k x k taps x C_in (BLOCK_K channels of one tap per tl.dot; with fewer than 16 input channels, an RGB layer,
BLOCK_K of the flattened (tap, channel) dimension per tl.dot instead, so that 3 channels are not padded to 16 in
every tap). tl.dot needs >= 16 on every side, so a layer with fewer output channels (the discriminator's last,
C_out = 1) runs BLOCK_N = 16 with the extra columns masked.
All tensors may have any strides (the launcher passes them), e.g. a weight kept as [k, k, C_in, C_out] in
memory for coalesced loads. tl.dot runs with input_precision="ieee" (true fp32) unless asked otherwise; bf16
weights (a bf16 file's) multiply the input rounded to bf16 on the tensor cores, with fp32 sums (utils.conv_dot), and
the output may be stored rounded to bf16 for the next such layer (out_dtype).
Bias and activation: utils.conv_epilogue (the sigmoid never overflows).

Reference: conv2d_reference below (plain PyTorch, fp32).
Test: python -m pytest tests/test_triton_conv2d.py (under TRITON_INTERPRET=1 on a CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import (CONV_ACTS, INTERPRETER, cast_rne, check_conv, conv_dot, conv_epilogue, conv_out_dtype,
                    conv_precision, conv_settings, conv_tap)

FLAT_K_BELOW = 16  # input channels under one BLOCK_K: the taps' channels are packed together (an RGB layer)


@triton.jit
def _conv2d_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    N, C_in, H, W, C_out, H_out, W_out,
    sxn, sxc, sxh, sxw,  # x strides
    swo, swi, swh, sww,  # w strides: (C_out, C_in, k, k)
    son, soc, soh, sow,  # out strides
    stride, padding, slope,
    KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, WIDEN_DOT: tl.constexpr, FLAT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) output pixel: (n, oy, ox)
    m_ok = m < N * H_out * W_out
    ox = m % W_out
    oy = (m // W_out) % H_out
    n = m // (W_out * H_out)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    co_ok = co < C_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # masks combine vectors only (the interpreter mistypes vector & scalar booleans): a tap's bounds are per pixel
    if FLAT_K:  # few input channels: K = (tap, channel) as one dimension, BLOCK_K of it per dot, no per-tap padding
        y0, x0 = oy * stride - padding, ox * stride - padding  # (BLOCK_M,) the window's corner
        for k0 in range(0, KERNEL * KERNEL * C_in, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            k_ok = kk < KERNEL * KERNEL * C_in
            tap, ci = kk // C_in, kk % C_in
            ky, kx = tap // KERNEL, tap % KERNEL
            iy, ix = y0[:, None] + ky[None, :], x0[:, None] + kx[None, :]  # (BLOCK_M, BLOCK_K)
            ok = m_ok[:, None] & k_ok[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            a = tl.load(x_ptr + n[:, None] * sxn + ci[None, :] * sxc + iy * sxh + ix * sxw, mask=ok, other=0.0)
            b = tl.load(w_ptr + (ky * swh + kx * sww + ci * swi)[:, None] + co[None, :] * swo,
                        mask=k_ok[:, None] & co_ok[None, :], other=0.0)
            acc = conv_dot(acc, a, b, PRECISION, WIDEN_DOT)  # (BLOCK_M, BLOCK_K) @ (BLOCK_K, BLOCK_N)
    else:
        for ky in range(0, KERNEL):
            iy = oy * stride - padding + ky  # (BLOCK_M,)
            for kx in range(0, KERNEL):
                ix = ox * stride - padding + kx
                row_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)  # (BLOCK_M,)
                x_row = x_ptr + n * sxn + iy * sxh + ix * sxw  # (BLOCK_M,) pointers
                acc = conv_tap(acc, x_row, row_ok, w_ptr + ky * swh + kx * sww, co, co_ok, C_in, sxc, swi, swo,
                               BLOCK_K, PRECISION, WIDEN_DOT)
    acc = conv_epilogue(acc, b_ptr, co, co_ok, slope, HAS_BIAS, ACT)
    out = out_ptr + (n * son + oy * soh + ox * sow)[:, None] + co[None, :] * soc
    tl.store(out, cast_rne(acc, out_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])  # fp32 or bf16


def conv2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1, padding: int = 0,
           act: str = "none", slope: float = 0.2, input_precision: str = "ieee",
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """act(F.conv2d(x, w, bias, stride, padding)) on the Triton kernel; slope: leaky_relu's negative slope.
    x (N, C_in, H, W) fp32 or bf16, w (C_out, C_in, k, k) fp32 or bf16 (any strides; bf16 weights multiply the
    input rounded to bf16: utils.conv_dot), bias (C_out,) fp32 or None -> (N, C_out, H_out, W_out) contiguous,
    out_dtype fp32 or bf16 (rounded to nearest even). input_precision "tf32" trades accuracy for tensor cores."""
    n, c_in, h, wd, c_out, k = check_conv(x, w, bias, act, transposed=False)
    if not (stride >= 1 and padding >= 0):
        raise ValueError(f"need stride >= 1 and padding >= 0; got {stride}, {padding}")
    h_out = (h + 2 * padding - k) // stride + 1
    w_out = (wd + 2 * padding - k) // stride + 1
    if h_out < 1 or w_out < 1 or n < 1 or c_out < 1:
        raise ValueError(f"input {tuple(x.shape)} and w {tuple(w.shape)} give an empty output "
                         f"({n}, {c_out}, {h_out}, {w_out})")
    out = torch.empty(n, c_out, h_out, w_out, device=x.device, dtype=conv_out_dtype(out_dtype))
    settings = conv_settings(c_in, c_out)
    grid = (triton.cdiv(n * h_out * w_out, settings["BLOCK_M"]), triton.cdiv(c_out, settings["BLOCK_N"]))
    _conv2d_kernel[grid](
        x, w, bias if bias is not None else out, out,
        n, c_in, h, wd, c_out, h_out, w_out,
        *x.stride(), *w.stride(), *out.stride(),
        stride, padding, float(slope),
        KERNEL=k, HAS_BIAS=bias is not None,
        ACT=CONV_ACTS[act], PRECISION=conv_precision(input_precision), WIDEN_DOT=INTERPRETER,
        FLAT_K=c_in < FLAT_K_BELOW, **settings,
    )
    return out


def conv2d_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                     padding: int = 0, act: str = "none", slope: float = 0.2) -> torch.Tensor:
    """Plain PyTorch, fp32 (not TF32, also on a GPU): F.conv2d without bias, + bias, act."""
    from aigc_rt.backends.torch_backend import CONV_ACTIVATIONS, fp32_convolutions  # cuDNN's fp32 default is TF32
    with fp32_convolutions():
        y = F.conv2d(x.float(), w.float(), None, stride, padding)
    if bias is not None:
        y = y + bias.float()[:, None, None]
    return CONV_ACTIVATIONS[act](y, slope)
