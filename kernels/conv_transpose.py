"""Transposed convolution with fused bias + activation, as an implicit GEMM in Triton (fp32, or bf16 weights).

    out[n, co, oy, ox] = act(bias[co] + sum over ci, ky, kx, iy, ix with oy = iy*s - p + ky, ox = ix*s - p + kx
                                        of x[n, ci, iy, ix] * w[ci, co, ky, kx])
    H_out = (H - 1) * s - 2p + k + output_padding (likewise W_out); act: "none", "relu", "tanh", "leaky_relu"
    (negative slope `slope`) or "sigmoid" (utils.CONV_ACTS, applied by utils.conv_epilogue; a generator's are relu
    and tanh).

Sub-pixel decomposition, as csrc/cpu/conv.cpp: output row oy only gets the taps ky with
(oy + p - ky) % s == 0, so the outputs split into s x s phases (oy % s, ox % s), each a dense convolution with
at most ceil(k / s) x ceil(k / s) taps: ky = (py + p) % s + j * s < k, input row iy = qy + (py + p - ky) / s for
output row oy = py + s * qy. Program axis 2 is the phase; axes 0 and 1 tile its GEMM: M = N x phase pixels (BLOCK_M),
N = C_out (BLOCK_N), K = taps x C_in (BLOCK_K per tl.dot). A dimension with one input pixel (a generator's
first layer: z as (N, nz, 1, 1)) has the stride replaced by k: k phases of one tap each, a plain GEMM.
All tensors may have any strides (the launcher passes them), e.g. a weight kept as [k, k, C_in, C_out] in
memory for coalesced loads. tl.dot runs with input_precision="ieee" (true fp32) unless asked otherwise; bf16
weights multiply the input rounded to bf16 on the tensor cores, with fp32 sums (utils.conv_dot), and the output may
be stored rounded to bf16 for the next such layer (out_dtype).

Reference: conv_transpose2d_reference below (plain PyTorch, fp32).
Test: python -m pytest tests/test_triton_conv_transpose.py (under TRITON_INTERPRET=1 on a CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import (CONV_ACTS, INTERPRETER, cast_rne, check_conv, conv_epilogue, conv_out_dtype, conv_precision,
                    conv_settings, conv_tap)


@triton.jit
def _conv_transpose_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    N, C_in, H, W, C_out, H_out, W_out,
    sxn, sxc, sxh, sxw,  # x strides
    swi, swo, swh, sww,  # w strides: (C_in, C_out, k, k)
    son, soc, soh, sow,  # out strides
    step_y, step_x, padding, slope,  # phase steps: the stride, or k for a dimension with one input pixel
    KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, PRECISION: tl.constexpr, WIDEN_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, phase = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    py, px = phase // step_x, phase % step_x
    qh = tl.maximum((H_out - py + step_y - 1) // step_y, 0)  # phase grid: output rows py, py + step_y, ...
    qw = tl.maximum((W_out - px + step_x - 1) // step_x, 0)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) pixel of the phase: (n, qy, qx)
    m_ok = m < N * qh * qw
    qx = m % tl.maximum(qw, 1)
    qy = (m // tl.maximum(qw, 1)) % tl.maximum(qh, 1)
    n = m // tl.maximum(qw * qh, 1)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    co_ok = co < C_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ry, rx = (py + padding) % step_y, (px + padding) % step_x  # first tap of the phase in each dim
    # masks combine vectors only (the interpreter mistypes vector & scalar booleans), so the tap loops stop at
    # the kernel's edge instead of masking taps past it
    for ty in range(0, (KERNEL - ry + step_y - 1) // step_y):
        ky = ry + ty * step_y
        iy = qy + (py + padding - ky) // step_y  # exact division: (py + padding - ky) % step_y == 0
        for tx in range(0, (KERNEL - rx + step_x - 1) // step_x):
            kx = rx + tx * step_x
            ix = qx + (px + padding - kx) // step_x
            row_ok = m_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)  # (BLOCK_M,)
            x_row = x_ptr + n * sxn + iy * sxh + ix * sxw  # (BLOCK_M,) pointers
            acc = conv_tap(acc, x_row, row_ok, w_ptr + ky * swh + kx * sww, co, co_ok, C_in, sxc, swi, swo, BLOCK_K,
                           PRECISION, WIDEN_DOT)
    acc = conv_epilogue(acc, b_ptr, co, co_ok, slope, HAS_BIAS, ACT)
    oy, ox = py + step_y * qy, px + step_x * qx
    out = out_ptr + (n * son + oy * soh + ox * sow)[:, None] + co[None, :] * soc
    tl.store(out, cast_rne(acc, out_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])  # fp32 or bf16


def conv_transpose2d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                     padding: int = 0, output_padding: int = 0, act: str = "none", slope: float = 0.2,
                     input_precision: str = "ieee", out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """act(F.conv_transpose2d(x, w, bias, stride, padding, output_padding)) on the Triton kernel.
    x (N, C_in, H, W) fp32 or bf16, w (C_in, C_out, k, k) fp32 or bf16 (any strides; bf16 weights multiply the
    input rounded to bf16: utils.conv_dot), bias (C_out,) fp32 or None -> (N, C_out, H_out, W_out) contiguous,
    out_dtype fp32 or bf16 (rounded to nearest even). input_precision "tf32" trades accuracy for tensor cores."""
    n, c_in, h, wd, c_out, k = check_conv(x, w, bias, act, transposed=True)
    if not (stride >= 1 and padding >= 0 and 0 <= output_padding < stride):
        raise ValueError(f"need stride >= 1, padding >= 0, 0 <= output_padding < stride; got {stride}, {padding}, "
                         f"{output_padding}")
    h_out = (h - 1) * stride - 2 * padding + k + output_padding
    w_out = (wd - 1) * stride - 2 * padding + k + output_padding
    if h_out < 1 or w_out < 1:
        raise ValueError(f"input {tuple(x.shape)} gives an empty output ({h_out} x {w_out})")
    out = torch.empty(n, c_out, h_out, w_out, device=x.device, dtype=conv_out_dtype(out_dtype))
    step_y, step_x = (k if h == 1 else stride), (k if wd == 1 else stride)
    settings = conv_settings(c_in, c_out)
    max_pixels = n * triton.cdiv(h_out, step_y) * triton.cdiv(w_out, step_x)  # phase (0, 0) is the largest
    grid = (triton.cdiv(max_pixels, settings["BLOCK_M"]), triton.cdiv(c_out, settings["BLOCK_N"]),
            step_y * step_x)
    _conv_transpose_kernel[grid](
        x, w, bias if bias is not None else out, out,
        n, c_in, h, wd, c_out, h_out, w_out,
        *x.stride(), *w.stride(), *out.stride(),
        step_y, step_x, padding, float(slope),
        KERNEL=k, HAS_BIAS=bias is not None,
        ACT=CONV_ACTS[act], PRECISION=conv_precision(input_precision), WIDEN_DOT=INTERPRETER, **settings,
    )
    return out


def conv_transpose2d_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                               padding: int = 0, output_padding: int = 0, act: str = "none",
                               slope: float = 0.2) -> torch.Tensor:
    """Plain PyTorch, fp32 (not TF32, also on a GPU): F.conv_transpose2d without padding, cropped by `padding` and
    extended by `output_padding` as the definition says (torch's own padded path rejects some paddings), + bias,
    act."""
    from aigc_rt.backends.torch_backend import CONV_ACTIVATIONS, fp32_convolutions  # cuDNN's fp32 default is TF32
    with fp32_convolutions():
        full = F.pad(F.conv_transpose2d(x.float(), w.float(), None, stride), (0, output_padding, 0, output_padding))
    h, wd = full.shape[2] - 2 * padding, full.shape[3] - 2 * padding
    y = full[:, :, padding:padding + h, padding:padding + wd]
    if bias is not None:
        y = y + bias.float()[:, None, None]
    return CONV_ACTIVATIONS[act](y, slope)
