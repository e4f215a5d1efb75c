"""Linear layer with a fused epilogue: y = act(x W^T + b).

    x (M, K) fp32 activations, W (N, K) fp32 | bf16 | fp16 weights, b (N,) fp32 or none,
    act = identity | GELU-tanh: 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))).
    x is rounded to W's dtype first (as the torch backend's F.linear(x.to(w.dtype), w)); products and the
    accumulation are fp32, so low-precision weights lose nothing more than that rounding.
    int8 weights (weight-only quantisation, the file's per-row scales s (N,)): y = act(s * (x q^T) + b), x kept
    in fp32 and q widened to fp32 in registers, i.e. the torch backend's x (q * s)^T up to fp32 rounding.

Two kernels, picked by the number of rows M (GEMV_MAX_M):
- _linear_kernel: tiled GEMM on tl.dot (fp32 operands in IEEE precision, never TF32), for prefill and for
  batched decode: M <= 16 rows fit in one tile row, so the weights are streamed exactly once.
- _gemv_kernel: batch-1 decode, y = W x as a broadcast multiply + row sums over narrow row blocks (more
  programs in flight than a 16-row dot tile gives; bench/bench_triton.py measures both against cuBLAS).
Decode (GEMV, and the GEMM at M <= 16) is bound by how many weight bytes are in flight, which depends on the
shape and the GPU, so on a GPU those two are autotuned per (N, K, dtypes) over a few block shapes (compiled
once per machine; the choice is cached on disk, so a machine keeps it); AIGC_RT_AUTOTUNE=0 takes the fixed
shapes of utils.gemv_settings / linear_settings instead. Prefill (M > 16) uses fixed GEMM tiles.
Test: tests/test_triton_kernels.py (test_linear*); benchmark: bench/bench_triton.py.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.testing
import triton.language as tl

from .utils import (FLOAT_DTYPES, INTERPRETER, cast_rne, check_out, check_tensor, device_fn, dot, gelu_tanh,
                    gemv_settings, linear_settings, pdl_begin, pdl_options)

GEMV_MAX_M = 1  # rows up to which the GEMV kernel is used (a policy the GPU benchmark can revisit)


@device_fn
def _epilogue(acc, s_ptr, b_ptr, cols, N, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
    if SCALED:
        acc *= tl.load(s_ptr + cols, mask=cols < N, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0)
    if GELU:
        acc = gelu_tanh(acc)
    return acc


@triton.jit
def _linear_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, x_stride, w_stride, y_stride,
                   SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, WIDEN_DOT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * x_stride + ks[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * w_stride + ks[:, None]  # (BLOCK_K, BLOCK_N): W^T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=(rows[:, None] < M) & (ks[None, :] + k0 < K), other=0.0)
        w = tl.load(w_ptrs, mask=(cols[None, :] < N) & (ks[:, None] + k0 < K), other=0.0)
        if SCALED:
            w = w.to(tl.float32)
        acc = dot(cast_rne(x, w.dtype), w, acc, WIDEN_DOT)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    acc = _epilogue(acc, s_ptr, b_ptr, cols[None, :], N, SCALED, HAS_BIAS, GELU)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * y_stride + cols[None, :], acc,
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, K, x_stride, w_stride, y_stride,
                 SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * w_stride + ks[None, :]  # (BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over k once, after the loop
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs, mask=(cols[:, None] < N) & (ks[None, :] + k0 < K), other=0.0)
        if SCALED:
            w = w.to(tl.float32)
        x = tl.load(x_ptr + row * x_stride + k0 + ks, mask=ks + k0 < K, other=0.0)
        acc += w.to(tl.float32) * cast_rne(x, w.dtype).to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    y = _epilogue(tl.sum(acc, axis=1), s_ptr, b_ptr, cols, N, SCALED, HAS_BIAS, GELU)
    tl.store(y_ptr + row * y_stride + cols, y, mask=cols < N)


def _quick_bench(fn, quantiles):
    """The autotuner's timer: medians over ~10 ms per candidate (triton's default spends ~125 ms)."""
    return triton.testing.do_bench(fn, warmup=2, rep=10, quantiles=quantiles)


def _no_wider_than_k(configs, named_args, **kwargs):
    """Drop candidates whose K block is wider than the whole row (they only add masked lanes)."""
    widest = max(64, triton.next_power_of_2(named_args["K"]))
    return [c for c in configs if c.kwargs["BLOCK_K"] <= widest] or configs[:1]


# (BLOCK_N, BLOCK_K, num_warps): from 4-row blocks that give many programs to 16-row blocks with long loads
_GEMV_CONFIGS = [(4, 1024, 4), (8, 512, 4), (8, 1024, 8), (4, 2048, 8), (16, 512, 8), (16, 1024, 8)]
# (BLOCK_N, BLOCK_K, num_stages) for the 16-row dot tile, num_warps 4
_SMALL_M_CONFIGS = [(16, 128, 4), (32, 128, 4), (64, 128, 4), (16, 256, 4), (32, 256, 3), (64, 64, 6)]
AUTOTUNE = not INTERPRETER and os.environ.get("AIGC_RT_AUTOTUNE", "1") != "0"
_gemv_tuned = triton.autotune(
    [triton.Config(dict(BLOCK_N=n, BLOCK_K=k), num_warps=w) for n, k, w in _GEMV_CONFIGS], key=["N", "K"],
    prune_configs_by=dict(early_config_prune=_no_wider_than_k), do_bench=_quick_bench, cache_results=True,
)(_gemv_kernel)
_small_m_tuned = triton.autotune(
    [triton.Config(dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k), num_warps=4, num_stages=st)
     for n, k, st in _SMALL_M_CONFIGS], key=["N", "K"],
    prune_configs_by=dict(early_config_prune=_no_wider_than_k), do_bench=_quick_bench, cache_results=True,
)(_linear_kernel)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, act: str | None = None, *,
           scale: torch.Tensor | None = None, out=None, kernel: str | None = None) -> torch.Tensor:
    """x (..., K) fp32, w (N, K), b (N,) fp32 or None, act None | "gelu_tanh" -> (..., N) fp32; scale (N,)
    fp32 for int8 weights and only for them. kernel: "gemv" | "gemm" | None (pick by the number of rows);
    tests and benchmarks force one."""
    check_tensor("x", x, None, (torch.float32,), None, last_contiguous=True)
    dev = x.device
    check_tensor("weight", w, 2, (*FLOAT_DTYPES, torch.int8), dev)
    N, K = w.shape
    if (w.dtype == torch.int8) != (scale is not None):
        raise ValueError(f"a scale is required for int8 weights and only for them (weight {w.dtype}, "
                         f"scale {'given' if scale is not None else 'missing'})")
    if scale is not None:
        check_tensor("scale", scale, 1, (torch.float32,), dev)
        if scale.shape[0] != N or not scale.is_contiguous():
            raise ValueError(f"scale must be a contiguous ({N},) tensor, got {tuple(scale.shape)}")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be the weight's in-features {K}")
    if not w.is_contiguous() or N == 0 or K == 0:
        raise ValueError(f"weight must be a contiguous, non-empty (out, in) matrix, got {tuple(w.shape)}")
    if b is not None:
        check_tensor("bias", b, 1, (torch.float32,), dev)
        if b.shape[0] != N or not b.is_contiguous():
            raise ValueError(f"bias must be a contiguous ({N},) tensor, got {tuple(b.shape)}")
    if act not in (None, "gelu_tanh"):
        raise ValueError(f"act must be None or 'gelu_tanh', got {act!r}")
    if kernel not in (None, "gemv", "gemm"):
        raise ValueError(f"kernel must be None, 'gemv' or 'gemm', got {kernel!r}")
    x2 = x.reshape(-1, K)  # (M, K)
    M = x2.shape[0]
    y = check_out(out, (*x.shape[:-1], N), torch.float32, dev)
    if M == 0:
        return y
    bias = w if b is None else b  # dummy pointers when HAS_BIAS / SCALED are off
    scales = w if scale is None else scale
    flags = dict(SCALED=scale is not None, HAS_BIAS=b is not None, GELU=act == "gelu_tanh", **pdl_options(dev))
    if kernel == "gemv" or kernel is None and M <= GEMV_MAX_M:
        if AUTOTUNE:
            _gemv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](
                x2, w, scales, bias, y, N, K, x2.stride(0), K, N, **flags)
        else:
            s = gemv_settings(N, w.dtype, dev)
            _gemv_kernel[(triton.cdiv(N, s["BLOCK_N"]), M)](x2, w, scales, bias, y, N, K, x2.stride(0), K, N, **flags,
                                                            **s)
    elif AUTOTUNE and M <= 16:
        _small_m_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), 1)](
            x2, w, scales, bias, y, M, N, K, x2.stride(0), K, N, **flags, WIDEN_DOT=False)
    else:
        s = linear_settings(M, N, dev)
        grid = (triton.cdiv(N, s["BLOCK_N"]), triton.cdiv(M, s["BLOCK_M"]))
        _linear_kernel[grid](x2, w, scales, bias, y, M, N, K, x2.stride(0), K, N, **flags, WIDEN_DOT=INTERPRETER, **s)
    return y


def reference(x, w, b=None, act=None, scale=None):
    """Plain-PyTorch fp32: act(x.to(w.dtype) W^T + b), every product and sum in fp32; int8 weights:
    act(x (w * scale)^T + b)."""
    if scale is not None:
        y = x @ (w.float() * scale[:, None]).t()
    else:
        y = x.to(w.dtype).float() @ w.float().t()
    if b is not None:
        y = y + b.float()
    return torch.nn.functional.gelu(y, approximate="tanh") if act == "gelu_tanh" else y
