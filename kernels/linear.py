"""Linear layer with a fused epilogue: y = act(x W^T + b).

    x (M, K) fp32 activations, W (N, K) fp32 | bf16 | fp16 weights, b (N,) fp32 or none,
    act = identity | GELU-tanh: 0.5 y (1 + tanh(sqrt(2/pi) (y + 0.044715 y^3))) | ReLU: max(y, 0).
    x is rounded to W's dtype first (as the torch backend's F.linear(x.to(w.dtype), w)); products and the
    accumulation are fp32, so low-precision weights lose nothing more than that rounding.
    int8 weights (weight-only quantisation, the file's per-row scales s (N,)): y = act(s * (x q^T) + b), x kept
    in fp32, i.e. the torch backend's x (q * s)^T up to fp32 rounding: the GEMV widens q to fp32 in registers;
    the GEMM multiplies q, exact in bf16, by x split into three bf16 parts that add up to x exactly
    (utils.split_bf16x3) on bf16 tensor-core dots with fp32 sums (an fp32 dot runs on Hopper's FMA pipes).
Two fusions that take a pre-norm transformer's LayerNorms and residual adds out of their own launches:
    norm = (g, beta, eps):  x -> LayerNorm(x) = (x - mean) / sqrt(var + eps) * g + beta first (per row, biased
                            variance, fp32), in the prologue: every program computes its rows' mean and variance
                            (one pass over x, from L2: the rows are short beside the weights; the GEMV reads
                            its row as one block) and normalises each x block as it loads it;
    residual = r (M, N):    r += y in the epilogue (the result is added into r in place and r is returned), each
                            element by the one program that owns it.

Two kernels, picked by the number of rows M (GEMV_MAX_M):
- _linear_kernel: tiled GEMM on tl.dot (fp32 operands at fp32 accuracy, never TF32: a prefill tile of fp32 weights
  splits both into bf16 parts for six tensor-core dots, utils.dot_fp32, a decode tile multiplies in IEEE fp32), for
  prefill and for batched decode: M <= 16 rows fit in one tile row, so the weights are streamed exactly once.
  With few output tiles and a long K (batched decode of a tall-skinny weight, e.g. 1.5B's 1600 x 6400: 100 tiles
  of 16 columns for 132 SMs) it splits K over SPLIT_K programs per tile: each writes its partial sums, and
  _split_k_reduce_kernel adds them in split order (deterministic, no atomics) and applies the epilogue.
- _gemv_kernel: batch-1 decode, y = W x as a broadcast multiply + row sums over narrow row blocks (more
  programs in flight than a 16-row dot tile gives; bench/bench_triton.py measures both against cuBLAS). With
  M rows it runs M programs per row block, each reading the block again, from L2 once one has read it from
  memory (the blocks of a row of programs are in flight together). For 2-16 rows the autotuned path times both
  kernels once per shape and keeps the faster (_faster): on the H200 of 2026-11-30 the 16-row dot tile ran
  batch-8 decode shapes 2.7-4.3x slower than cuBLAS, and the GEMV read a batch-1 row block in about cuBLAS's
  time.
Decode (GEMV, and the GEMM at M <= 16) is bound by how many weight bytes are in flight, which depends on the
shape and the GPU, so on a GPU those two are autotuned per (N, K, dtypes) over a few block shapes (compiled
once per machine; the choice is cached on disk, so a machine keeps it); AIGC_RT_AUTOTUNE=0 takes the fixed
shapes of utils.gemv_settings / linear_settings instead. On Hopper some candidates of both (PREFETCH) first ask
L2 for the program's whole weight slice (utils.prefetch_l2: a bulk prefetch per row), so that every byte is
requested from the start, and under PDL before the wait, while the kernel before drains. A plain GEMV program has
one weight block in flight at a time (its loads, then its sums: the SASS of 2026-12-01), so two more kinds of GEMV
candidates keep more in flight: STAGES > 1, the K loop software-pipelined (tl.range num_stages: blocks copied
asynchronously into shared memory that many iterations ahead), and PERSISTENT, a few programs per SM each taking
many whole-row blocks, the next one's loads issued before the current one's sums (_gemv_persistent). Prefill
(M > 16) uses fixed GEMM tiles.
Test: tests/test_triton_kernels.py (test_linear*); benchmark: bench/bench_triton.py.
"""
from __future__ import annotations

import os
import threading

import torch
import triton
import triton.testing
import triton.language as tl

from .utils import (FLOAT_DTYPES, INTERPRETER, PREFETCH_MAX_BYTES, cast_rne, cast_to, check_out, check_scale,
                    check_tensor, check_vector, column_sums, device_fn, dot, dot_at, gelu_tanh, gemv_settings,
                    l2_prefetchable, launch_tuned, linear_settings, num_sms, overlaps, pdl_begin, pdl_options,
                    prefetch_l2, split_bf16x3)

ACTIVATIONS = (None, "gelu_tanh", "relu")  # the epilogue's
INT4_GROUP = 64  # int4 weights: inputs per scale (format.INT4_GROUP)
GEMV_MAX_M = 1  # rows up to which the GEMV kernel is always used
PICKED_MAX_M = 16  # above GEMV_MAX_M and up to this many rows, autotuned launches time both kernels (_faster)


@device_fn
def _row_stats(x_ptr, rows, M, K, x_stride, eps, BLOCK: tl.constexpr):
    """(mean, 1 / sqrt(var + eps)) of x's rows `rows` (R,) over K columns, in one pass over blocks of BLOCK
    columns: each block's own mean and centred sum of squares, combined as Chan et al. do (stable; for a row of
    one block, exactly the two-pass values). Each block is one round trip to L2 before the weights can stream,
    so the GEMV reads its row as one block. Rows >= M get (0, 1 / sqrt(eps))."""
    ks = tl.arange(0, BLOCK)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * x_stride + ks[None, :]  # (R, BLOCK)
    mean = tl.zeros_like(rows).to(tl.float32)  # (R,)
    squares = tl.zeros_like(mean)
    seen = 0.0
    for k0 in range(0, K, BLOCK):
        in_x = (rows[:, None] < M) & (ks[None, :] + k0 < K)
        x = tl.load(x_ptrs + k0, mask=in_x, other=0.0)
        count = tl.minimum(K - k0, BLOCK).to(tl.float32)
        block_mean = tl.sum(x, axis=1) / count
        centred = tl.where(in_x, x - block_mean[:, None], 0.0)
        total = seen + count
        delta = block_mean - mean
        mean += delta * (count / total)
        squares += tl.sum(centred * centred, axis=1) + delta * delta * (seen * count / total)
        seen = total
    return mean, 1.0 / tl.sqrt(squares / K + eps)


@device_fn
def _normalise(x, mean, rstd, g_ptr, beta_ptr, ks, in_x, K):
    """LayerNorm of an x block (R, BLOCK_K) at columns ks (BLOCK_K,), given its rows' statistics (R,); 0 where
    in_x is false."""
    g = tl.load(g_ptr + ks, mask=ks < K, other=0.0)
    beta = tl.load(beta_ptr + ks, mask=ks < K, other=0.0)
    return tl.where(in_x, (x - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :], 0.0)


@device_fn
def _store(y_ptrs, y, mask, ACCUMULATE: tl.constexpr):
    """y into y_ptrs, or (ACCUMULATE) added to what they hold: the residual stream, y_ptrs[i] += y[i]."""
    if ACCUMULATE:
        y += tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, y, mask=mask)


@device_fn
def _epilogue(acc, s_ptr, b_ptr, cols, N, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
              RELU: tl.constexpr):
    if SCALED:
        acc *= tl.load(s_ptr + cols, mask=cols < N, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0)
    if GELU:
        acc = gelu_tanh(acc)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as torch.relu (max.f32 would drop it)
    return acc


@device_fn
def finish_partials(sums_ptr, n_groups, width, col0, N, s_ptr, b_ptr, dst_ptr, rc, rr, SCALED: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ADD: tl.constexpr, RBLOCK: tl.constexpr, GROUP: tl.constexpr):
    """The epilogue of a launch that gathered its partial sums (utils.gather_partials), run by the program that got
    last: output column col0 + c (of N) for each c < width is the sum of the n_groups group sums
    sums_ptr[i * width + c] (utils.column_sums: in index order), scaled (int8 weights) and biased, then stored to
    dst_ptr[col0 + c] or (ADD: the residual stream) added to it. rc, rr: tl.arange(0, RBLOCK), tl.arange(0, GROUP)."""
    for c0 in range(0, width, RBLOCK):
        y = column_sums(sums_ptr, n_groups, width, c0 + rc, c0 + rc < width, rr, RBLOCK, GROUP)
        cols = col0 + c0 + rc
        in_c = (c0 + rc < width) & (cols < N)
        y = _epilogue(y, s_ptr, b_ptr, cols, N, SCALED, HAS_BIAS, False, False)
        if ADD:
            y = tl.load(dst_ptr + cols, mask=in_c, other=0.0) + y
        tl.store(dst_ptr + cols, y, mask=in_c)


@triton.jit
def _linear_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, g_ptr, beta_ptr, M, N, K, x_stride, w_stride,
                   y_stride, eps, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                   NORM: tl.constexpr, NORM_BLOCK: tl.constexpr, ACCUMULATE: tl.constexpr,
                   WIDEN_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr, RELU: tl.constexpr = False):
    n0 = tl.program_id(0) * BLOCK_N
    split = tl.program_id(2)
    k_len = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # K range per split, whole K blocks (maybe none)
    k_lo = split * k_len
    if PREFETCH:  # the program's rows of W over its K range requested from L2 at once, before any wait
        item = w_ptr.dtype.element_ty.primitive_bitwidth // 8
        prefetch_l2(w_ptr + n0.to(tl.int64) * w_stride + k_lo, tl.where(k_lo < K, tl.minimum(BLOCK_N, N - n0), 0),
                    (tl.minimum(k_len, K - k_lo)) * item, w_stride * item)
    pdl_begin(PDL)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * x_stride + (k_lo + ks)[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * w_stride + (k_lo + ks)[:, None]  # (BLOCK_K, BLOCK_N): W^T tile
    if NORM:
        mean, rstd = _row_stats(x_ptr, rows, M, K, x_stride, eps, NORM_BLOCK)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + k_len, K), BLOCK_K):
        in_x = (rows[:, None] < M) & (ks[None, :] + k0 < K)
        x = tl.load(x_ptrs, mask=in_x, other=0.0)
        if NORM:
            x = _normalise(x, mean, rstd, g_ptr, beta_ptr, ks + k0, in_x, K)
        w = tl.load(w_ptrs, mask=(cols[None, :] < N) & (ks[:, None] + k0 < K), other=0.0)
        if SCALED:  # int8 q exact in bf16, fp32 x as three bf16 parts: x q^T on the tensor cores (smallest first)
            w = w.to(tl.float32).to(tl.bfloat16)  # through fp32: the interpreter casts int8 to bf16 bitwise
            hi, mid, lo = split_bf16x3(x)
            acc = dot(hi, w, dot(mid, w, dot(lo, w, acc, WIDEN_DOT), WIDEN_DOT), WIDEN_DOT)
        elif w.dtype == tl.float32 and BLOCK_M <= 16:  # an fp32 decode tile reads its weights once: the FMA pipes
            acc = dot(x, w, acc, WIDEN_DOT)  # keep up (dot_fp32's split spilled here)
        else:  # x rounded to 16-bit W; an fp32 prefill tile: six bf16 tensor-core dots (utils.dot_at)
            acc = dot_at(x, w, acc, WIDEN_DOT)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    in_tile = (rows[:, None] < M) & (cols[None, :] < N)
    if SPLIT_K == 1:
        acc = _epilogue(acc, s_ptr, b_ptr, cols[None, :], N, SCALED, HAS_BIAS, GELU, RELU)
        _store(y_ptr + rows[:, None].to(tl.int64) * y_stride + cols[None, :], acc, in_tile, ACCUMULATE)
    else:  # partial sums (SPLIT_K, M, N); _split_k_reduce_kernel finishes
        tl.store(part_ptr + ((split * M + rows[:, None]).to(tl.int64) * N + cols[None, :]), acc, mask=in_tile)


@triton.jit
def _split_k_reduce_kernel(part_ptr, s_ptr, b_ptr, y_ptr, M, N, y_stride, SCALED: tl.constexpr,
                           HAS_BIAS: tl.constexpr, GELU: tl.constexpr, ACCUMULATE: tl.constexpr,
                           SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr, RELU: tl.constexpr = False):
    pdl_begin(PDL)
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):  # in split order: the same sum every run
        acc += tl.load(part_ptr + (split * M + row) * N + cols, mask=cols < N, other=0.0)
    acc = _epilogue(acc, s_ptr, b_ptr, cols, N, SCALED, HAS_BIAS, GELU, RELU)
    _store(y_ptr + row * y_stride + cols, acc, cols < N, ACCUMULATE)


def _split_k_reduce(args: dict) -> None:
    """Finish a split-K launch of _linear_kernel, given its arguments (also the autotuner's post-hook, so that
    a split configuration is timed with its reduction)."""
    if args["SPLIT_K"] == 1:
        return
    M, N = args["M"], args["N"]
    _split_k_reduce_kernel[(triton.cdiv(N, 1024), M)](
        args["part_ptr"], args["s_ptr"], args["b_ptr"], args["y_ptr"], M, N, args["y_stride"],
        SCALED=args["SCALED"], HAS_BIAS=args["HAS_BIAS"], GELU=args["GELU"], RELU=args.get("RELU", False),
        ACCUMULATE=args["ACCUMULATE"],
        SPLIT_K=args["SPLIT_K"], BLOCK=1024,
        num_warps=4, PDL=args["PDL"], **({"launch_pdl": True} if args["PDL"] else {}))


@device_fn
def _gemv_persistent(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, g_ptr, beta_ptr, N, K, x_stride, w_stride, y_stride, eps,
                     SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, NORM: tl.constexpr,
                     NORM_BLOCK: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr, RELU: tl.constexpr):
    """_gemv_kernel's PERSISTENT form, for rows of K <= BLOCK_K: the launch has a few programs per SM (gemv_grid),
    each taking row blocks blk, blk + programs, ... of W whole, so that a program's x row is loaded, normalised
    and rounded once, there is no K loop, and the next row block's loads are issued before the current one's
    sums: every program keeps a block of weights in flight from start to end, where a program per row block
    drains and ends after one or two blocks (the H200's batch-1 GEMVs ran at 50-60% of its bandwidth, cuBLAS's
    too)."""
    row = tl.program_id(1).to(tl.int64)
    step = tl.num_programs(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    ns = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    in_k = ks < K
    offsets = ns[:, None].to(tl.int64) * w_stride + ks[None, :]  # (BLOCK_N, BLOCK_K) within a row block
    first = tl.program_id(0)
    # as _gemv_kernel's PDL branch: the first block requested before the wait (no kernel of ours writes weights)
    w_next = tl.load(w_ptr + first.to(tl.int64) * BLOCK_N * w_stride + offsets,
                     mask=(first * BLOCK_N + ns < N)[:, None] & in_k[None, :], other=0.0)
    pdl_begin(PDL)
    x = tl.load(x_ptr + row * x_stride + ks, mask=in_k, other=0.0)[None, :]  # (1, BLOCK_K)
    if NORM:
        mean, rstd = _row_stats(x_ptr, tl.zeros((1,), dtype=tl.int64) + row, row + 1, K, x_stride, eps, NORM_BLOCK)
        x = _normalise(x, mean, rstd, g_ptr, beta_ptr, ks, in_k[None, :], K)
    if not SCALED:  # int8 multiplies fp32 x
        x = cast_to(x, w_ptr.dtype.element_ty)
    for blk in range(first, n_blocks, step):
        w = w_next
        nxt = blk + step  # past the last block: every lane masked, nothing read
        w_next = tl.load(w_ptr + nxt.to(tl.int64) * BLOCK_N * w_stride + offsets,
                         mask=(nxt * BLOCK_N + ns < N)[:, None] & in_k[None, :], other=0.0)
        cols = blk * BLOCK_N + ns
        y = _epilogue(tl.sum(w.to(tl.float32) * x, axis=1), s_ptr, b_ptr, cols, N, SCALED, HAS_BIAS, GELU, RELU)
        _store(y_ptr + row * y_stride + cols, y, cols < N, ACCUMULATE)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, g_ptr, beta_ptr, N, K, x_stride, w_stride, y_stride, eps,
                 SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, NORM: tl.constexpr,
                 NORM_BLOCK: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PREFETCH: tl.constexpr, PDL: tl.constexpr, RELU: tl.constexpr = False, PERSISTENT: tl.constexpr = 0,
                 STAGES: tl.constexpr = 1):
    if PERSISTENT:  # programs per SM (gemv_grid); 0: a program per row block, over K in BLOCK_K steps
        _gemv_persistent(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, g_ptr, beta_ptr, N, K, x_stride, w_stride, y_stride, eps,
                         SCALED, HAS_BIAS, GELU, NORM, NORM_BLOCK, ACCUMULATE, BLOCK_N, BLOCK_K, PDL, RELU)
    else:
        row = tl.program_id(1).to(tl.int64)
        n0 = tl.program_id(0) * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
        ks = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + cols[:, None].to(tl.int64) * w_stride + ks[None, :]  # (BLOCK_N, BLOCK_K)
        in_n = cols[:, None] < N
        if PREFETCH:  # the program's rows of W requested from L2 at once, before any wait
            row_bytes = K * (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
            prefetch_l2(w_ptr + n0.to(tl.int64) * w_stride, tl.minimum(BLOCK_N, N - n0), row_bytes, row_bytes)
        if PDL:
            # With programmatic dependent launch the first weight block is requested before the wait, so that it
            # streams in while the kernel before drains. Safe: no kernel of ours writes weights, and a kernel of
            # ours lets the next one launch only after its own wait, so whatever wrote these weights has finished.
            # Each later block is requested one iteration ahead.
            w_next = tl.load(w_ptrs, mask=in_n & (ks[None, :] < K), other=0.0)
        pdl_begin(PDL)
        if NORM:
            rows = tl.zeros((1,), dtype=tl.int64) + row
            mean, rstd = _row_stats(x_ptr, rows, row + 1, K, x_stride, eps, NORM_BLOCK)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over k once, after the loop
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            if PDL:
                w = w_next
                w_next = tl.load(w_ptrs + BLOCK_K, mask=in_n & (ks[None, :] + k0 + BLOCK_K < K), other=0.0)
            else:
                w = tl.load(w_ptrs, mask=in_n & (ks[None, :] + k0 < K), other=0.0)
            if SCALED:
                w = w.to(tl.float32)
            x = tl.load(x_ptr + row * x_stride + k0 + ks, mask=ks + k0 < K, other=0.0)[None, :]  # (1, BLOCK_K)
            if NORM:
                x = _normalise(x, mean, rstd, g_ptr, beta_ptr, ks + k0, (ks + k0 < K)[None, :], K)
            acc += w.to(tl.float32) * cast_rne(x, w.dtype).to(tl.float32)
            w_ptrs += BLOCK_K
        y = _epilogue(tl.sum(acc, axis=1), s_ptr, b_ptr, cols, N, SCALED, HAS_BIAS, GELU, RELU)
        _store(y_ptr + row * y_stride + cols, y, cols < N, ACCUMULATE)


@triton.jit
def _gemv_int4_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, g_ptr, beta_ptr, N, K, x_stride, w_stride, s_stride, y_stride,
                      eps, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, NORM: tl.constexpr, NORM_BLOCK: tl.constexpr,
                      ACCUMULATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                      RELU: tl.constexpr = False, STAGES: tl.constexpr = 1):
    """_gemv_kernel for int4 weights as the file holds them (format.quantize_int4): w (N, K / 2) uint8, byte j of a
    row holding inputs 2j (low nibble) and 2j + 1 (high) as q + 8, and s (N, ceil(K / 64)) fp32, one scale per
    group of 64 inputs. Each program unpacks its BLOCK_N x BLOCK_K / 2 bytes in registers, multiplies the levels
    q by the fp32 activations (even and odd inputs apart), sums each group's 32 pairs and scales the sum: the
    torch backend's x (q s)^T up to the order of the fp32 sums. A quarter of bf16's bytes, 4.5 bits a weight."""
    row = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    ks = tl.arange(0, BLOCK_K)  # inputs of a block
    js = tl.arange(0, BLOCK_K // 2)  # its bytes: inputs 2j, 2j + 1
    gs = tl.arange(0, BLOCK_K // 64)  # its groups
    in_n = cols[:, None] < N
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * w_stride + js[None, :]  # (BLOCK_N, BLOCK_K / 2)
    s_ptrs = s_ptr + cols[:, None].to(tl.int64) * s_stride + gs[None, :]  # (BLOCK_N, BLOCK_K / 64)
    pdl_begin(PDL)
    if NORM:
        mean, rstd = _row_stats(x_ptr, tl.zeros((1,), dtype=tl.int64) + row, row + 1, K, x_stride, eps, NORM_BLOCK)
    acc = tl.zeros((BLOCK_N, BLOCK_K // 64), dtype=tl.float32)  # per group, reduced after the loop
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):  # software-pipelined where STAGES > 1 (_gemv_kernel)
        # bytes bounded by the row's w_stride = K / 2 (w contiguous), so that the loads stay 16 bytes wide
        q = tl.load(w_ptrs, mask=in_n & (js[None, :] + k0 // 2 < w_stride), other=0)
        in_x = ks + k0 < K
        x = tl.load(x_ptr + row * x_stride + k0 + ks, mask=in_x, other=0.0)[None, :]  # (1, BLOCK_K)
        if NORM:
            x = _normalise(x, mean, rstd, g_ptr, beta_ptr, ks + k0, in_x[None, :], K)
        x_even, x_odd = tl.split(tl.reshape(x, (1, BLOCK_K // 2, 2)))  # (1, BLOCK_K / 2) each
        lo = (q & 15).to(tl.float32) - 8.0
        hi = (q >> 4).to(tl.float32) - 8.0
        pairs = tl.reshape(lo * x_even + hi * x_odd, (BLOCK_N, BLOCK_K // 64, 32))
        scale = tl.load(s_ptrs, mask=in_n & (gs[None, :] * 64 + k0 < K), other=0.0)
        acc += tl.sum(pairs, axis=2) * scale
        w_ptrs += BLOCK_K // 2
        s_ptrs += BLOCK_K // 64
    y = _epilogue(tl.sum(acc, axis=1), s_ptr, b_ptr, cols, N, False, HAS_BIAS, GELU, RELU)
    _store(y_ptr + row * y_stride + cols, y, cols < N, ACCUMULATE)


def _quick_bench(fn, quantiles):
    """The autotuner's timer: medians over ~10 ms per candidate (triton's default spends ~125 ms)."""
    return triton.testing.do_bench(fn, warmup=2, rep=10, quantiles=quantiles)


def _no_wider_than_k(configs, named_args, **kwargs):
    """Drop candidates whose K block is wider than the whole row (they only add masked lanes), split-K
    candidates that would leave a split fewer than two K blocks, PERSISTENT GEMV ones narrower than the row and
    pipelined ones (STAGES > 1) with a row of one block (nothing to pipeline)."""
    K = named_args["K"]
    widest = max(64, triton.next_power_of_2(K))
    return [c for c in configs if c.kwargs["BLOCK_K"] <= widest
            and (c.kwargs.get("SPLIT_K", 1) == 1 or K >= 2 * c.kwargs["SPLIT_K"] * c.kwargs["BLOCK_K"])
            and (not c.kwargs.get("PERSISTENT") or c.kwargs["BLOCK_K"] >= K)
            and (c.kwargs.get("STAGES", 1) == 1 or K > c.kwargs["BLOCK_K"])] or configs[:1]


# (BLOCK_N, BLOCK_K, num_warps, PREFETCH): from 1-2 warps on 2-4 rows (many small programs, as CUDA GEMVs run a
# warp per row) to 16-row blocks with long loads; the shapes the H200 run of 2026-11-29 chose also with the
# program's rows prefetched into L2 up front (Hopper; see _candidates)
_GEMV_CONFIGS = [(2, 512, 1, False), (4, 1024, 2, False), (4, 1024, 4, False), (8, 512, 4, False),
                 (8, 1024, 8, False), (4, 2048, 8, False), (16, 512, 8, False), (16, 1024, 8, False),
                 (4, 1024, 4, True), (8, 512, 4, True), (8, 1024, 8, True), (16, 512, 8, True)]
# (BLOCK_N, BLOCK_K, num_warps, STAGES) with the K loop software-pipelined (tl.range num_stages: the weight and x
# blocks copied asynchronously into shared memory STAGES - 1 iterations ahead, where a plain loop has one block
# in flight per program): rows of two or more blocks
_GEMV_PIPELINED_CONFIGS = [(8, 256, 4, 3), (16, 256, 4, 3), (4, 512, 4, 4), (8, 512, 4, 3), (16, 512, 8, 3),
                           (8, 1024, 8, 3)]
# (BLOCK_N, BLOCK_K, num_warps, programs per SM) of the PERSISTENT form (rows of K <= BLOCK_K, one block wide):
# 8-32 KB of weights in flight per program, two or four programs per SM
_GEMV_PERSISTENT_CONFIGS = [(4, 1024, 4, 4), (8, 1024, 4, 4), (8, 1024, 8, 2), (2, 2048, 4, 4), (4, 2048, 8, 2),
                            (8, 2048, 8, 2), (2, 4096, 8, 2), (4, 4096, 8, 2)]
# (BLOCK_N, BLOCK_K, num_stages, SPLIT_K, PREFETCH) for the 16-row dot tile, num_warps 4; the shapes the H200
# run of 2026-11-29 chose, and split-K ones, also with the program's weights prefetched into L2 up front
_SMALL_M_CONFIGS = [(16, 128, 4, 1, False), (32, 128, 4, 1, False), (64, 128, 4, 1, False), (16, 256, 4, 1, False),
                    (32, 256, 3, 1, False), (64, 64, 6, 1, False), (16, 128, 4, 4, False), (32, 128, 4, 2, False),
                    (32, 128, 4, 4, False), (64, 64, 6, 4, False),
                    (32, 128, 4, 1, True), (64, 64, 6, 1, True), (16, 128, 4, 4, True), (32, 128, 4, 4, True)]
MAX_SPLIT_K = max(c[3] for c in _SMALL_M_CONFIGS)
AUTOTUNE = not INTERPRETER and os.environ.get("AIGC_RT_AUTOTUNE", "1") != "0"
_timed_y: list[torch.Tensor] = []  # the output before a timed run of the batched GEMM (under _small_m_lock)


def _before_timed_run(args: dict, reset_only: bool = False) -> None:
    if not reset_only:
        _timed_y[:] = [args["y_ptr"].clone()]


def _after_timed_run(args: dict, exception) -> None:
    """The autotuner's post-hook for the batched GEMM: a split configuration is timed with its reduction, and
    the output is put back as it was (an accumulating run adds into it: the residual stream)."""
    if exception is None:
        _split_k_reduce(args)
    args["y_ptr"].copy_(_timed_y.pop())


def _candidates(configs, named_args, **kwargs):
    """_no_wider_than_k, and the L2-prefetching candidates only where the prefetch may run (l2_prefetchable) and a
    program's weights (its rows over its share of K) take at most PREFETCH_MAX_BYTES."""
    w, K = named_args["w_ptr"], named_args["K"]
    row_bytes = K * w.element_size()
    ok = l2_prefetchable(w, row_bytes)
    configs = [c for c in configs if not c.kwargs["PREFETCH"]
               or ok and c.kwargs["BLOCK_N"] * row_bytes // c.kwargs.get("SPLIT_K", 1) <= PREFETCH_MAX_BYTES]
    return _no_wider_than_k(configs, named_args)


_gemv_tuned = triton.autotune(
    [triton.Config(dict(BLOCK_N=n, BLOCK_K=k, PREFETCH=p, PERSISTENT=0), num_warps=w) for n, k, w, p in _GEMV_CONFIGS]
    + [triton.Config(dict(BLOCK_N=n, BLOCK_K=k, PREFETCH=False, PERSISTENT=0, STAGES=st), num_warps=w)
       for n, k, w, st in _GEMV_PIPELINED_CONFIGS]
    + [triton.Config(dict(BLOCK_N=n, BLOCK_K=k, PREFETCH=False, PERSISTENT=per_sm), num_warps=w)
       for n, k, w, per_sm in _GEMV_PERSISTENT_CONFIGS],
    key=["N", "K"], prune_configs_by=dict(early_config_prune=_candidates), do_bench=_quick_bench,
    cache_results=True,
    restore_value=["y_ptr"],  # timed runs that accumulate must not change the residual stream
)(_gemv_kernel)
_small_m_tuned = triton.autotune(
    [triton.Config(dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, SPLIT_K=sk, PREFETCH=p), num_warps=4, num_stages=st)
     for n, k, st, sk, p in _SMALL_M_CONFIGS], key=["N", "K"],
    prune_configs_by=dict(early_config_prune=_candidates), do_bench=_quick_bench, cache_results=True,
    pre_hook=_before_timed_run, post_hook=_after_timed_run,
)(_linear_kernel)
# (BLOCK_N, BLOCK_K, num_warps, STAGES) for the int4 GEMV: a program's bytes per block are BLOCK_N x BLOCK_K / 2
_GEMV_INT4_CONFIGS = [(4, 512, 4, 1), (8, 512, 4, 1), (8, 1024, 4, 1), (16, 512, 8, 1), (16, 1024, 8, 1),
                      (4, 2048, 8, 1), (16, 256, 4, 3), (8, 512, 4, 3), (16, 512, 8, 3)]
_gemv_int4_tuned = triton.autotune(
    [triton.Config(dict(BLOCK_N=n, BLOCK_K=k, STAGES=st), num_warps=w) for n, k, w, st in _GEMV_INT4_CONFIGS],
    key=["N", "K"], prune_configs_by=dict(early_config_prune=_no_wider_than_k), do_bench=_quick_bench,
    cache_results=True, restore_value=["y_ptr"],
)(_gemv_int4_kernel)


def gemv_grid(N: int, M: int, device: torch.device):
    """The GEMV's launch grid for a configuration `meta`: a program per row block and row of x, or (PERSISTENT =
    programs per SM) that many programs per SM shared among the M rows, none without a row block of its own."""
    def grid(meta):
        blocks = triton.cdiv(N, meta["BLOCK_N"])
        if meta.get("PERSISTENT"):
            blocks = min(blocks, triton.cdiv(meta["PERSISTENT"] * num_sms(device), M))
        return blocks, M
    return grid


def int4_gemv_settings(K: int, device: torch.device) -> dict:
    """The int4 GEMV's block shape without autotuning (AIGC_RT_AUTOTUNE=0, the interpreter): BLOCK_K a power of
    two from 64 (the scale group) up to 512 or 1024 inputs, no wider than the row."""
    widest = 1024 if device.type == "cuda" else 128
    # the interpreter: 16 rows a program (it pays per program, not per element)
    return dict(BLOCK_N=8 if device.type == "cuda" else 16, BLOCK_K=min(widest, max(64, triton.next_power_of_2(K))),
                num_warps=4)


_small_m_lock = threading.Lock()  # best_config is read back right after the launch that set it


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, act: str | None = None, *,
           scale: torch.Tensor | None = None, norm: tuple | None = None, residual: torch.Tensor | None = None,
           out=None, kernel: str | None = None, split_k: int | None = None) -> torch.Tensor:
    """x (..., K) fp32, w (N, K), b (N,) fp32 or None, act None | "gelu_tanh" | "relu" -> y (..., N) fp32; scale (N,)
    fp32 for int8 weights and only for them. norm (g, beta, eps), g and beta (K,) fp32: y = linear(LayerNorm(x)).
    residual (..., N) fp32: residual += y in place, and residual is returned (out must then be None).
    kernel: "gemv" | "gemm" | None (pick by the number of rows); split_k: K splits of the GEMM (None: autotuned
    up to 16 rows, else 1). Tests and benchmarks force them."""
    if kernel not in (None, "gemv", "gemm"):
        raise ValueError(f"kernel must be None, 'gemv' or 'gemm', got {kernel!r}")
    if split_k is not None and not (isinstance(split_k, int) and 1 <= split_k <= 64):
        raise ValueError(f"split_k must be None or an int in [1, 64], got {split_k!r}")
    x2, y, N, K = operands(x, w, b, act, scale, norm, residual, out)
    dev, M = x.device, x2.shape[0]
    if AUTOTUNE and kernel is None and split_k is None and GEMV_MAX_M < M <= PICKED_MAX_M:
        kernel = _faster((M, N, K, w.dtype, norm is not None), y, lambda k: linear(
            x, w, b, act, scale=scale, norm=norm, residual=residual, out=out, kernel=k))
    g, beta, eps = norm if norm is not None else (x, x, 1.0)  # dummies when NORM is off
    if M == 0:
        return y
    bias = w if b is None else b  # dummy pointers when HAS_BIAS / SCALED are off
    scales = w if scale is None else scale
    flags = dict(SCALED=scale is not None, HAS_BIAS=b is not None, GELU=act == "gelu_tanh", RELU=act == "relu",
                 NORM=norm is not None, ACCUMULATE=residual is not None, **pdl_options(dev))
    if kernel == "gemv" or kernel is None and M <= GEMV_MAX_M:
        args = (x2, w, scales, bias, y, g, beta, N, K, x2.stride(0), K, N, float(eps))
        norm_block = _norm_block(norm, K, 1)
        if AUTOTUNE:
            launch_tuned(_gemv_tuned, gemv_grid(N, M, dev), *args, **flags, NORM_BLOCK=norm_block)
        else:
            s = gemv_settings(N, w.dtype, dev)
            _gemv_kernel[(triton.cdiv(N, s["BLOCK_N"]), M)](*args, **flags, NORM_BLOCK=norm_block, PREFETCH=False, **s)
        return y
    reduce = dict(s_ptr=scales, b_ptr=bias, y_ptr=y, M=M, N=N, y_stride=N, **flags)
    if AUTOTUNE and M <= 16 and split_k is None:
        part = torch.empty(MAX_SPLIT_K, M, N, device=dev)  # partial sums, for split-K configurations
        with _small_m_lock:
            launch_tuned(_small_m_tuned, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), 1, meta["SPLIT_K"]),
                         x2, w, scales, bias, y, part, g, beta, M, N, K, x2.stride(0), K, N, float(eps), **flags,
                         NORM_BLOCK=_norm_block(norm, K, 16), WIDEN_DOT=INTERPRETER)
            chosen = _small_m_tuned.best_config.kwargs["SPLIT_K"]
        _split_k_reduce(dict(part_ptr=part, SPLIT_K=chosen, **reduce))
    else:
        s = linear_settings(M, N, dev)
        sk = split_k or 1
        part = torch.empty(sk, M, N, device=dev) if sk > 1 else y
        grid = (triton.cdiv(N, s["BLOCK_N"]), triton.cdiv(M, s["BLOCK_M"]), sk)
        _linear_kernel[grid](x2, w, scales, bias, y, part, g, beta, M, N, K, x2.stride(0), K, N, float(eps), **flags,
                             NORM_BLOCK=_norm_block(norm, K, s["BLOCK_M"]), WIDEN_DOT=INTERPRETER, SPLIT_K=sk,
                             PREFETCH=False, **s)
        _split_k_reduce(dict(part_ptr=part, SPLIT_K=sk, **reduce))
    return y


# (M, N, K, weight dtype, fused LayerNorm) -> the faster kernel, "gemv" or "gemm"; also the triton backend's fused
# sub-layers, ("mlp" | "attn_proj" | "attn_block", ...) -> "fused" or "composed" (triton_backend._pick)
_picked: dict[tuple, str] = {}
picked_times: dict[tuple, dict[str, float]] = {}  # the same keys -> each choice's median ms (bench/gpu_profile.py)


def _faster(key: tuple, y: torch.Tensor, launch, choices: tuple[str, ...] = ("gemm", "gemv")) -> str:
    """The faster of `choices` (the GEMM and the GEMV here; TritonBackend.mlp's fused and composed MLP) for a
    launch of shape `key`, timed on the first launch of that shape (each autotuned over its own candidates) and
    remembered. launch(choice) runs the launch that way; y is its output, put back as it was after the timed
    runs (an accumulating launch adds into it). While a CUDA graph is being captured nothing can be timed: an
    untimed shape takes the first choice (for the linear, the GEMM: the choice before this pick existed)."""
    kernel = _picked.get(key)
    if kernel is None:
        if y.is_cuda and torch.cuda.is_current_stream_capturing():
            return choices[0]
        kept = y.clone()
        times = picked_times[key] = {k: _quick_bench(lambda k=k: launch(k), None) for k in choices}
        y.copy_(kept)
        kernel = _picked[key] = min(times, key=times.get)
    return kernel


def operands(x, w, b, act, scale, norm, residual, out) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """linear()'s checks, shared with the CUDA GEMV (aigc_rt/cuda_kernels.py): ValueError naming the problem,
    else (x as (M, K), the output (residual, out or a new tensor), N, K). On x's device."""
    check_tensor("x", x, None, (torch.float32,), None, last_contiguous=True)
    dev = x.device
    check_tensor("weight", w, 2, (*FLOAT_DTYPES, torch.int8), dev)
    N, K = w.shape
    check_scale("weight", w, scale, dev)
    if not w.is_contiguous() or N == 0 or K == 0:
        raise ValueError(f"weight must be a contiguous, non-empty (out, in) matrix, got {tuple(w.shape)}")
    return _activations(x, N, K, b, act, norm, residual, out)


def _activations(x, N: int, K: int, b, act, norm, residual, out) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """operands() past the weight's own checks (x already checked as an fp32 tensor)."""
    dev = x.device
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be the weight's in-features {K}")
    if b is not None:
        check_vector("bias", b, N, (torch.float32,), dev)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if norm is not None:
        _check_norm(norm, K, dev)
    if residual is not None:
        if out is not None:
            raise ValueError("linear: give out or residual, not both (with residual the result goes into it)")
        y = check_out(residual, (*x.shape[:-1], N), torch.float32, dev, name="residual")
        if overlaps(residual, x):
            raise ValueError("linear: residual must not overlap x (it is written while x is read)")
    else:
        y = check_out(out, (*x.shape[:-1], N), torch.float32, dev)
    return x.reshape(-1, K), y, N, K


def linear_int4(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None = None,
                act: str | None = None, *, norm: tuple | None = None, residual: torch.Tensor | None = None,
                out=None) -> torch.Tensor:
    """linear() for int4 weights as the file holds them: w (N, K / 2) uint8 nibble pairs, scale (N, ceil(K / 64))
    fp32 (format.quantize_int4). Up to PICKED_MAX_M rows of x (decode) the int4 GEMV, a program row per row of x;
    more rows (a prefill) on the weight dequantised to bf16 for the call, through linear()."""
    check_tensor("x", x, None, (torch.float32,), None, last_contiguous=True)
    dev = x.device
    check_tensor("weight", w, 2, (torch.uint8,), dev)
    N, K = w.shape[0], 2 * w.shape[1]
    check_tensor("scale", scale, 2, (torch.float32,), dev)
    if not w.is_contiguous() or N == 0 or K == 0:
        raise ValueError(f"int4 weight must be contiguous, non-empty (out, in / 2) nibble pairs, got {tuple(w.shape)}")
    if tuple(scale.shape) != (N, -(-K // INT4_GROUP)) or not scale.is_contiguous():
        raise ValueError(f"int4 scale has shape {tuple(scale.shape)}; expected ({N}, {-(-K // INT4_GROUP)}) "
                         f"contiguous (one per row and group of {INT4_GROUP} inputs)")
    x2, y, N, K = _activations(x, N, K, b, act, norm, residual, out)
    M = x2.shape[0]
    if M > PICKED_MAX_M:  # into y, checked (or allocated) above
        from ..format import dequantize_int4
        return linear(x, dequantize_int4(w, scale).to(torch.bfloat16), b, act, norm=norm, residual=residual,
                      out=None if residual is not None else y)
    if M == 0:
        return y
    g, beta, eps = norm if norm is not None else (x, x, 1.0)  # dummies when NORM is off
    args = (x2, w, scale, w if b is None else b, y, g, beta, N, K, x2.stride(0), K // 2, scale.shape[1], N,
            float(eps))
    flags = dict(HAS_BIAS=b is not None, GELU=act == "gelu_tanh", RELU=act == "relu", NORM=norm is not None,
                 ACCUMULATE=residual is not None, NORM_BLOCK=_norm_block(norm, K, 1), **pdl_options(dev))
    if AUTOTUNE:
        launch_tuned(_gemv_int4_tuned, lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M), *args, **flags)
    else:
        s = int4_gemv_settings(K, dev)
        _gemv_int4_kernel[(triton.cdiv(N, s["BLOCK_N"]), M)](*args, **flags, **s)
    return y


def _norm_block(norm, K: int, rows: int) -> int:
    """Columns per block of the LayerNorm statistics (one L2 round trip each, before the weights stream): the
    whole row where rows x columns stay within 8,192 values in registers (a GEMV's row up to K = 8,192; 512
    columns of the 16-row tile), 16 (unused) without a norm."""
    return min(triton.next_power_of_2(K), max(16, 8192 // rows)) if norm is not None else 16


def _check_norm(norm, K: int, dev: torch.device) -> None:
    """norm = (g, beta, eps): the LayerNorm applied to x's rows first, g and beta contiguous (K,) fp32; ValueError
    otherwise."""
    if not (isinstance(norm, tuple) and len(norm) == 3):
        raise ValueError(f"norm must be a (weight, bias, eps) tuple, got {type(norm).__name__}")
    g, beta, eps = norm
    check_vector("norm weight", g, K, (torch.float32,), dev)
    check_vector("norm bias", beta, K, (torch.float32,), dev)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"norm eps must be > 0, got {eps!r}")


def reference(x, w, b=None, act=None, scale=None, norm=None, residual=None):
    """Plain-PyTorch fp32: act(x.to(w.dtype) W^T + b), every product and sum in fp32; int8 weights:
    act(x (w * scale)^T + b). norm (g, beta, eps): x = F.layer_norm(x) first; residual: returns residual + y
    (without touching residual)."""
    if norm is not None:
        x = torch.nn.functional.layer_norm(x, (x.shape[-1],), norm[0], norm[1], norm[2])
    if residual is not None:
        return residual + reference(x, w, b, act, scale)
    if scale is not None:
        y = x @ (w.float() * scale[:, None]).t()
    else:
        y = x.to(w.dtype).float() @ w.float().t()
    if b is not None:
        y = y + b.float()
    return torch.nn.functional.gelu(y, approximate="tanh") if act == "gelu_tanh" else y.relu() if act == "relu" else y
