"""Decode attention (flash-decoding): one query per sequence over its KV cache, split over the sequence.

    O[b, h] = sum_{j < len[b]} softmax_j(q[b, h] . K[b, h, j] / sqrt(D)) V[b, h, j]

GPT-2 has 12 to 25 heads: one program per (row, head) would leave most of a GPU idle, so the cache's S
positions are cut into n_splits chunks of SPLIT_LEN and pass 1 runs one program per (row x head, chunk):
    m_s = max_j s_j,  l_s = sum_j exp(s_j - m_s),  o_s = sum_j exp(s_j - m_s) V_j / l_s,  lse_s = m_s + log l_s
over the chunk's positions below len[b] (chunks at or past len[b] exit at once; slots at or past len[b] are
never read: they may hold anything, NaN included). Pass 2 merges a row-head's chunks:
    O = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M),  M = max_s lse_s.
A short cache (a few blocks of positions: decode_settings) is one chunk: pass 1 then writes O = o_0 itself
(bitwise what the merge of one chunk gives) and there is no pass 2, a launch fewer per layer where a decode
step is bound by launches, not by the cache it reads.
The layout depends only on the cache's capacity S (never on a per-step maximum length), so the same launch
can be replayed from a CUDA graph while the lengths grow on the device. A row with len 0 gets zeros.
With new_kv = (k, v) and positions, pass 1 also appends the step's keys and values (write_kv, fused): the
program whose chunk holds positions[b] stores them, rounded to the cache's dtype, and every program reads
them from registers for that position instead of from the cache, so the result is bitwise that of write_kv
followed by attention_decode, with one launch fewer.
Two more fusions for a decode step's few rows, each taking launches out of a GPT-2 block:
- proj = (W_o, bias, scale) with residual r: the output projection and the residual add, r += O W_o^T + bias.
  Each (row, head, slice) program multiplies its head's output by that head's columns of W_o, for a slice of
  W_o's outputs (slices put more programs on W_o than a row has heads), and the row's heads' partials are added
  in head order by the last program to arrive (utils.gather_partials: counters, no float atomics).
- attention_block: also the qkv linear with its LayerNorm, over a cache read in one pass: each program computes
  its own head's q, k, v from LayerNorm(r) (heads do not depend on each other), so the whole attention
  sub-layer is one launch. Every program reads r, so r is written only by the row's last program. Or, spread:
  a head's q, k, v rows are split over several programs (no head computed twice), written to a scratch row, and
  the head's last program to finish reads them back, attends and projects through all of W_o's outputs.
Test: tests/test_triton_kernels.py (test_attention_decode*), tests/test_triton_fused.py (the fusions);
benchmark: bench/bench_triton.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .linear import _check_norm, _epilogue, _norm_block, _normalise, _row_stats, finish_partials
from .utils import (FLOAT_DTYPES, MAX_HEAD_DIM, arrive, cast_rne, cast_to, check_caches, check_out, check_scale,
                    check_tensor, check_vector, checked_counters, decode_settings, device_fn,
                    gather_partials, pdl_begin, pdl_options)

LOG2E = 1.4426950408889634


@device_fn
def _head_qkv(r_ptr, b, h, H, dims, in_d, g_ptr, beta_ptr, wq_ptr, sq_ptr, bq_ptr, r_stride, eps,
              HEAD_DIM: tl.constexpr, SCALED: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, NORM_BLOCK: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Head h's q, k, v (BLOCK_D,) each, fp32, of row b: LayerNorm(r[b]) W^T + bias over W's rows h * HEAD_DIM + d,
    C + h * HEAD_DIM + d and 2C + h * HEAD_DIM + d (W (3C, C), C = H * HEAD_DIM: q, k, v side by side, as GPT-2's
    c_attn), linear.py's numerics (the normalised row rounded to W's dtype; int8: kept fp32, the scales applied to
    the sums); 0 past HEAD_DIM."""
    C = H * HEAD_DIM
    mean, rstd = _row_stats(r_ptr, tl.zeros((1,), dtype=tl.int64) + b, b + 1, C, r_stride, eps, NORM_BLOCK)
    x_row = r_ptr + b.to(tl.int64) * r_stride
    ks = tl.arange(0, BLOCK_K)
    rows = h * HEAD_DIM + dims  # (BLOCK_D,) q's rows of W; k's and v's C and 2C further
    w_ptrs = wq_ptr + rows[:, None].to(tl.int64) * C + ks[None, :]  # (BLOCK_D, BLOCK_K)
    aq = tl.zeros_like(dims).to(tl.float32)
    ak = tl.zeros_like(aq)
    av = tl.zeros_like(aq)
    for k0 in range(0, C, BLOCK_K):
        in_k = ks + k0 < C
        x = tl.load(x_row + k0 + ks, mask=in_k, other=0.0)[None, :]  # (1, BLOCK_K)
        x = _normalise(x, mean, rstd, g_ptr, beta_ptr, ks + k0, in_k[None, :], C)
        m = in_d[:, None] & in_k[None, :]
        wq = tl.load(w_ptrs, mask=m, other=0.0)
        wk = tl.load(w_ptrs + C * C, mask=m, other=0.0)
        wv = tl.load(w_ptrs + 2 * C * C, mask=m, other=0.0)
        if not SCALED:
            x = cast_to(x, wq.dtype)
        aq += tl.sum(wq.to(tl.float32) * x, axis=1)
        ak += tl.sum(wk.to(tl.float32) * x, axis=1)
        av += tl.sum(wv.to(tl.float32) * x, axis=1)
        w_ptrs += BLOCK_K
    q = _epilogue(aq, sq_ptr, bq_ptr, rows, 3 * C, SCALED, HAS_QKV_BIAS, False, False)
    k = _epilogue(ak, sq_ptr, bq_ptr, C + rows, 3 * C, SCALED, HAS_QKV_BIAS, False, False)
    v = _epilogue(av, sq_ptr, bq_ptr, 2 * C + rows, 3 * C, SCALED, HAS_QKV_BIAS, False, False)
    return tl.where(in_d, q, 0.0), tl.where(in_d, k, 0.0), tl.where(in_d, v, 0.0)


@device_fn
def _head_qkv_rows(r_ptr, b, h, H, p, qkv_ptr, g_ptr, beta_ptr, wq_ptr, sq_ptr, bq_ptr, r_stride, eps,
                   HEAD_DIM: tl.constexpr, SCALED: tl.constexpr, HAS_QKV_BIAS: tl.constexpr,
                   NORM_BLOCK: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """Rows p * ROWS .. (p + 1) * ROWS - 1 of head h's 3 * HEAD_DIM rows of LayerNorm(r[b]) W^T + bias (q's
    HEAD_DIM rows, then k's, then v's: W's rows t * C + h * HEAD_DIM + d) into qkv[b] (3C,) fp32 at the same
    columns; _head_qkv's numerics. The loop over C pipelined (STAGES - 1 steps in flight ahead)."""
    C = H * HEAD_DIM
    mean, rstd = _row_stats(r_ptr, tl.zeros((1,), dtype=tl.int64) + b, b + 1, C, r_stride, eps, NORM_BLOCK)
    x_row = r_ptr + b.to(tl.int64) * r_stride
    j = p * ROWS + tl.arange(0, ROWS)
    in_j = j < 3 * HEAD_DIM
    rows = (j // HEAD_DIM) * C + h * HEAD_DIM + j % HEAD_DIM  # (ROWS,) rows of W, columns of qkv
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = wq_ptr + rows[:, None].to(tl.int64) * C + ks[None, :]  # (ROWS, BLOCK_K)
    acc = tl.zeros((ROWS,), dtype=tl.float32)
    for k0 in tl.range(0, C, BLOCK_K, num_stages=STAGES):
        in_k = ks + k0 < C
        x = tl.load(x_row + k0 + ks, mask=in_k, other=0.0)[None, :]  # (1, BLOCK_K)
        x = _normalise(x, mean, rstd, g_ptr, beta_ptr, ks + k0, in_k[None, :], C)
        w = tl.load(w_ptrs + k0, mask=in_j[:, None] & in_k[None, :], other=0.0)
        if not SCALED:
            x = cast_to(x, w.dtype)
        acc += tl.sum(w.to(tl.float32) * x, axis=1)
    y = _epilogue(acc, sq_ptr, bq_ptr, rows, 3 * C, SCALED, HAS_QKV_BIAS, False, False)
    tl.store(qkv_ptr + b.to(tl.int64) * 3 * C + rows, y, mask=in_j)


@device_fn
def _project(out, b, h, H, dims, in_d, p, n_slices, w_ptr, ws_ptr, wb_ptr, r_ptr, pp_ptr, count_ptr, N, r_stride,
             part_rows, count_stride, tot_ptr, row_count_ptr, HEAD_DIM: tl.constexpr, SCALED: tl.constexpr,
             HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr, RBLOCK: tl.constexpr,
             ROW_LAST: tl.constexpr, STAGES: tl.constexpr):
    """r[b, cols] += O[b] W[cols]^T + bias[cols] for slice p of n_slices of W's N outputs (NP = N / n_slices
    rounded up to 16: cols = p * NP ..), O[b] the row's heads side by side (H * HEAD_DIM inputs), computed by the
    H programs (b, h, p) together: this one's head `out` (BLOCK_D,) times W's columns h * HEAD_DIM + d (a head's
    part of a row of W is HEAD_DIM contiguous values), its partial (NP,) written to pp[b, p, h], the partials
    added in head order by the last program to arrive (utils.gather_partials), which applies the scale (int8 W),
    the bias and the residual add. `out` is rounded to W's dtype first (as linear.py rounds its x; int8: kept
    fp32). Slices put more programs on the projection than a row has heads (12 to 25). ROW_LAST (when the
    launch's programs read r[b] themselves, QKV): a slice's last program writes its result to tot[b] instead, and
    the last slice of the row to finish (its counter, row_count[b]) adds all of tot[b] into r[b]: only after
    every program of the row has read r. STAGES > 1: the loop over W's tiles software-pipelined (tl.range
    num_stages), STAGES - 1 tiles in flight ahead of the one being summed."""
    if not SCALED:
        out = cast_to(out, w_ptr.dtype.element_ty)
    K = H * HEAD_DIM
    NP = tl.cdiv(tl.cdiv(N, n_slices), 16) * 16
    col0 = p * NP
    cs = tl.arange(0, BLOCK_C)
    row = b * n_slices + p  # the (row, slice)'s partials and counters
    part_row = pp_ptr + row.to(tl.int64) * part_rows * NP
    for c0 in tl.range(0, NP, BLOCK_C, num_stages=STAGES):
        cols = col0 + c0 + cs
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * K + h * HEAD_DIM + dims[None, :],
                    mask=(cols < N)[:, None] & in_d[None, :], other=0.0)  # (BLOCK_C, BLOCK_D); 0 past N
        tl.store(part_row + h * NP + c0 + cs, tl.sum(w.to(tl.float32) * out[None, :], axis=1), mask=cs + c0 < NP)
    rc = tl.arange(0, RBLOCK)
    rr = tl.arange(0, GROUP)
    last, n_groups = gather_partials(part_row, h, H, NP, count_ptr + row * count_stride, rc, rr, RBLOCK, GROUP)
    if last:
        r_row = r_ptr + b.to(tl.int64) * r_stride
        finish_partials(part_row + H * NP, n_groups, NP, col0, N, ws_ptr, wb_ptr,
                        tot_ptr + b.to(tl.int64) * N if ROW_LAST else r_row, rc, rr, SCALED, HAS_BIAS, not ROW_LAST,
                        RBLOCK, GROUP)
        if ROW_LAST:
            if arrive(row_count_ptr + b, n_slices):
                for c0 in range(0, N, RBLOCK):
                    cols = c0 + rc
                    y = tl.load(tot_ptr + b.to(tl.int64) * N + cols, mask=cols < N, other=0.0, cache_modifier=".cg")
                    tl.store(r_row + cols, tl.load(r_row + cols, mask=cols < N, other=0.0) + y, mask=cols < N)


@device_fn
def _attend(q, k_ptr, v_ptr, k_ss, v_ss, start, end, dims, in_d, new_k, new_v, new_pos, qk_scale,
            APPEND: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (row, head)'s attention over its cache's positions start .. end - 1 (start < end; k_ptr, v_ptr at its
    position 0, positions k_ss / v_ss apart), online softmax in the log2 domain (qk_scale includes log2 e):
    (o, m, l), o = sum_j exp2(s_j - m) V_j / l, m = max_j s_j, l = sum_j exp2(s_j - m). APPEND: position new_pos
    (this step's) takes its k, v from registers (new_k, new_v, rounded as the cache keeps them), not the cache."""
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros(q.shape, dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        pos = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        valid = pos < end
        k = tl.load(k_ptr + pos[:, None] * k_ss + dims[None, :], mask=valid[:, None] & in_d[None, :],
                    other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        is_new = (pos == new_pos) & valid  # the slot being written: its k, v come from registers
        if APPEND:
            k = tl.where(is_new[:, None], new_k[None, :], k)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1) * qk_scale, float("-inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # finite: pos = start_n < end is valid
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_ptr + pos[:, None] * v_ss + dims[None, :], mask=valid[:, None] & in_d[None, :],
                    other=0.0).to(tl.float32)
        if APPEND:
            v = tl.where(is_new[:, None], new_v[None, :], v)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    return acc / l_i, m_i, l_i


@triton.jit
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, len_ptr, part_o_ptr, part_lse_ptr, new_k_ptr, new_v_ptr, pos_ptr, o_ptr,
                         H, S, qk_scale, q_sb, q_sh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, nk_sb, nk_sh, nv_sb, nv_sh,
                         o_sb, o_sh, w_ptr, ws_ptr, wb_ptr, r_ptr, pp_ptr, count_ptr, N, r_stride, part_rows,
                         count_stride, tot_ptr, row_count_ptr, g_ptr, beta_ptr, wq_ptr, sq_ptr, bq_ptr, eps,
                         HEAD_DIM: tl.constexpr, SPLIT_LEN: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, APPEND: tl.constexpr, SINGLE: tl.constexpr, PDL: tl.constexpr,
                         PROJ: tl.constexpr = False, SCALED: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
                         BLOCK_C: tl.constexpr = 16, GROUP: tl.constexpr = 2, RBLOCK: tl.constexpr = 16,
                         QKV: tl.constexpr = False, HAS_QKV_BIAS: tl.constexpr = False,
                         NORM_BLOCK: tl.constexpr = 16, BLOCK_K: tl.constexpr = 16,
                         PROJ_STAGES: tl.constexpr = 1):
    pdl_begin(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    length = tl.minimum(tl.load(len_ptr + b), S)  # never past the cache, whatever lengths holds
    start = split * SPLIT_LEN
    dims = tl.arange(0, BLOCK_D)
    in_d = dims < HEAD_DIM
    k_ptr += b.to(tl.int64) * k_sb + h.to(tl.int64) * k_sh
    v_ptr += b.to(tl.int64) * v_sb + h.to(tl.int64) * v_sh
    new_pos = -1
    if QKV:  # q, k, v computed here from LayerNorm(r[b]) (the qkv linear fused in; one pass, appending)
        q, new_k, new_v = _head_qkv(r_ptr, b, h, H, dims, in_d, g_ptr, beta_ptr, wq_ptr, sq_ptr, bq_ptr, r_stride,
                                    eps, HEAD_DIM, SCALED, HAS_QKV_BIAS, NORM_BLOCK, BLOCK_K)
    else:
        q = tl.load(q_ptr + b.to(tl.int64) * q_sb + h * q_sh + dims, mask=in_d, other=0.0).to(tl.float32)
        new_k, new_v = q, q  # never read without APPEND
        if APPEND:
            new_k = tl.load(new_k_ptr + b.to(tl.int64) * nk_sb + h * nk_sh + dims, mask=in_d, other=0.0)
            new_v = tl.load(new_v_ptr + b.to(tl.int64) * nv_sb + h * nv_sh + dims, mask=in_d, other=0.0)
    if APPEND:  # this step's k, v, rounded as the cache keeps them (stored at the end by the chunk of their slot)
        new_pos = tl.load(pos_ptr + b)
        new_k = cast_to(new_k, k_ptr.dtype.element_ty)
        new_v = cast_to(new_v, v_ptr.dtype.element_ty)
    out = tl.zeros((BLOCK_D,), dtype=tl.float32)  # SINGLE: the output, zeros for a row of length 0 (as the merge)
    if start < length:
        out, m_i, l_i = _attend(q, k_ptr, v_ptr, k_ss, v_ss, start, tl.minimum(start + SPLIT_LEN, length), dims, in_d,
                                new_k, new_v, new_pos, qk_scale, APPEND, BLOCK_N)
        if not SINGLE:
            part = bh.to(tl.int64) * tl.num_programs(1) + split
            tl.store(part_o_ptr + part * BLOCK_D + dims, out)
            tl.store(part_lse_ptr + part, m_i + tl.log2(l_i))
    if SINGLE:  # the whole sequence in this program: the output itself (what the merge of one chunk gives)
        if PROJ:  # ... through the output projection into the residual stream
            _project(out, b, h, H, dims, in_d, tl.program_id(2), tl.num_programs(2), w_ptr, ws_ptr, wb_ptr, r_ptr,
                     pp_ptr, count_ptr, N, r_stride, part_rows, count_stride, tot_ptr, row_count_ptr, HEAD_DIM,
                     SCALED, HAS_BIAS, BLOCK_C, GROUP, RBLOCK, QKV, PROJ_STAGES)
        else:
            tl.store(o_ptr + b.to(tl.int64) * o_sb + h * o_sh + dims, cast_rne(out, o_ptr.dtype.element_ty),
                     mask=in_d)
    if APPEND:  # last, so that nothing above could have read the slot back (the interpreter runs in order)
        if (new_pos >= start) & (new_pos < start + SPLIT_LEN) & (new_pos < S):
            tl.store(k_ptr + new_pos * k_ss + dims, new_k.to(k_ptr.dtype.element_ty), mask=in_d)
            tl.store(v_ptr + new_pos * v_ss + dims, new_v.to(v_ptr.dtype.element_ty), mask=in_d)


@triton.jit
def _attention_block_spread_kernel(r_ptr, k_ptr, v_ptr, len_ptr, pos_ptr, qkv_ptr, H, S, qk_scale, k_sb, k_sh, k_ss,
                                   v_sb, v_sh, v_ss, w_ptr, ws_ptr, wb_ptr, res_ptr, pp_ptr, count_ptr, N, r_stride,
                                   part_rows, count_stride, tot_ptr, head_count_ptr, g_ptr, beta_ptr, wq_ptr,
                                   sq_ptr, bq_ptr, eps, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_D: tl.constexpr, PDL: tl.constexpr, SCALED: tl.constexpr,
                                   HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr,
                                   RBLOCK: tl.constexpr, HAS_QKV_BIAS: tl.constexpr, NORM_BLOCK: tl.constexpr,
                                   QKV_ROWS: tl.constexpr, BLOCK_K: tl.constexpr, QKV_STAGES: tl.constexpr,
                                   PROJ_STAGES: tl.constexpr):
    """attention_block's "spread" shape: program (row b x head h, p) computes its QKV_ROWS of the head's q, k, v
    rows into qkv[b]; the head's last program to arrive (its counter, head_count[b * H + h]) reads the head's
    q, k, v back, attends over the cache with this step's k, v appended, and projects the head's output through
    all of W_o's outputs (one slice: _project), the row's heads' partials added by the last head into r[b]. r is
    read only by the programs computing q, k, v, and each head attends only after all of its programs have read
    it, so the last head adds into r directly."""
    pdl_begin(PDL)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    C = H * HEAD_DIM
    _head_qkv_rows(r_ptr, b, h, H, tl.program_id(1), qkv_ptr, g_ptr, beta_ptr, wq_ptr, sq_ptr, bq_ptr, r_stride, eps,
                   HEAD_DIM, SCALED, HAS_QKV_BIAS, NORM_BLOCK, QKV_ROWS, BLOCK_K, QKV_STAGES)
    if arrive(head_count_ptr + bh, tl.num_programs(1)):
        dims = tl.arange(0, BLOCK_D)
        in_d = dims < HEAD_DIM
        head = qkv_ptr + b.to(tl.int64) * 3 * C + h * HEAD_DIM + dims  # written by this launch: read from L2
        q = tl.load(head, mask=in_d, other=0.0, cache_modifier=".cg")
        k_ptr += b.to(tl.int64) * k_sb + h.to(tl.int64) * k_sh
        v_ptr += b.to(tl.int64) * v_sb + h.to(tl.int64) * v_sh
        new_k = cast_to(tl.load(head + C, mask=in_d, other=0.0, cache_modifier=".cg"), k_ptr.dtype.element_ty)
        new_v = cast_to(tl.load(head + 2 * C, mask=in_d, other=0.0, cache_modifier=".cg"), v_ptr.dtype.element_ty)
        new_pos = tl.load(pos_ptr + b)
        length = tl.minimum(tl.load(len_ptr + b), S)
        out = tl.zeros((BLOCK_D,), dtype=tl.float32)  # zeros for a row of length 0
        if length > 0:
            out, _, _ = _attend(q, k_ptr, v_ptr, k_ss, v_ss, 0, length, dims, in_d, new_k, new_v, new_pos, qk_scale,
                                True, BLOCK_N)
        _project(out, b, h, H, dims, in_d, 0, 1, w_ptr, ws_ptr, wb_ptr, res_ptr, pp_ptr, count_ptr, N, r_stride,
                 part_rows, count_stride, tot_ptr, head_count_ptr, HEAD_DIM, SCALED, HAS_BIAS, BLOCK_C, GROUP, RBLOCK,
                 False, PROJ_STAGES)
        if (new_pos >= 0) & (new_pos < S):  # last: the attention above read the slot from registers
            tl.store(k_ptr + new_pos * k_ss + dims, new_k.to(k_ptr.dtype.element_ty), mask=in_d)
            tl.store(v_ptr + new_pos * v_ss + dims, new_v.to(v_ptr.dtype.element_ty), mask=in_d)


@triton.jit
def _decode_merge_kernel(part_o_ptr, part_lse_ptr, len_ptr, o_ptr, H, S, o_sb, o_sh, N_SPLITS, w_ptr, ws_ptr, wb_ptr,
                         r_ptr, pp_ptr, count_ptr, N, r_stride, part_rows, count_stride, HEAD_DIM: tl.constexpr,
                         SPLIT_LEN: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
                         PROJ: tl.constexpr = False, SCALED: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
                         BLOCK_C: tl.constexpr = 16, GROUP: tl.constexpr = 2, RBLOCK: tl.constexpr = 16,
                         PROJ_STAGES: tl.constexpr = 1):
    pdl_begin(PDL)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    length = tl.minimum(tl.load(len_ptr + b), S)
    splits = tl.arange(0, BLOCK_S)
    used = splits < tl.cdiv(length, SPLIT_LEN)  # the chunks pass 1 wrote
    part = bh.to(tl.int64) * N_SPLITS + splits
    lse = tl.load(part_lse_ptr + part, mask=used, other=float("-inf"))  # (BLOCK_S,)
    top = tl.max(lse, axis=0)
    w = tl.where(used, tl.exp2(lse - top), 0.0)
    dims = tl.arange(0, BLOCK_D)
    o = tl.load(part_o_ptr + part[:, None] * BLOCK_D + dims[None, :], mask=used[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)  # (BLOCK_D,); zeros for len 0
    if PROJ:
        _project(out, b, h, H, dims, dims < HEAD_DIM, tl.program_id(1), tl.num_programs(1), w_ptr, ws_ptr, wb_ptr,
                 r_ptr, pp_ptr, count_ptr, N, r_stride, part_rows, count_stride, r_ptr, count_ptr, HEAD_DIM, SCALED,
                 HAS_BIAS, BLOCK_C, GROUP, RBLOCK, False, PROJ_STAGES)
    else:
        tl.store(o_ptr + b.to(tl.int64) * o_sb + h * o_sh + dims, cast_rne(out, o_ptr.dtype.element_ty),
                 mask=dims < HEAD_DIM)


def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor,
                     max_len: int | None = None, *, out=None, new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                     positions: torch.Tensor | None = None, proj: tuple | None = None,
                     residual: torch.Tensor | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, D); k_cache, v_cache (B, H, S, D) (e.g. views cache.k[layer]); lengths (B,) int on the
    device: row b attends to its first lengths[b] positions. max_len (a host int >= max(lengths)) is only
    checked against S: the launch depends on S alone. -> (B, H, D), q's dtype.
    new_kv (k, v) with positions: write_kv(k_cache, v_cache, positions, k, v) first, in the same launch.
    proj (W, bias, scale) with residual (B, N) fp32: the output projection too, residual += O W^T + bias with O
    the (B, H * D) attention output (never written out; out must be None), and residual is returned. W (N, H * D)
    fp32 | bf16 | fp16 | int8 (with its (N,) scale), bias (N,) fp32 or None; linear.py's numerics (O rounded to
    W's dtype). counters: a utils.new_counters() buffer (needed while a CUDA graph is being captured)."""
    check_tensor("q", q, 3, FLOAT_DTYPES, None, last_contiguous=True)
    dev = q.device
    B, H, D = q.shape
    check_caches(k_cache, v_cache, B, H, D, dev, "q")
    check_vector("lengths", lengths, B, (torch.int64, torch.int32), dev)
    S = k_cache.shape[2]
    if max_len is not None and not 1 <= max_len <= S:
        raise ValueError(f"max_len={max_len} must be in [1, {S}] (the cache's capacity)")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    if (new_kv is None) != (positions is None):
        raise ValueError("attention_decode: new_kv and positions go together (one was given without the other)")
    if new_kv is not None:
        check_new_kv(*new_kv, positions, B, H, D, dev)
    new_k, new_v = new_kv if new_kv is not None else (q, q)  # dummy pointers without APPEND
    s = decode_settings(B * H, S, D, dev)
    if proj is not None:
        o, project = None, _projection(proj, residual, counters, out, B, H, D, s, dev)
    else:
        if residual is not None or counters is not None:
            raise ValueError("attention_decode: residual and counters go with proj")
        o, project = check_out(out, (B, H, D), q.dtype, dev), _no_projection(q)
    if B * H == 0:
        return o if proj is None else residual
    if S == 0:  # nothing to attend to: a zero output
        if proj is None:
            return o.zero_()
        return residual if proj[1] is None else residual.add_(proj[1])
    n_splits, block_d = s["n_splits"], s["BLOCK_D"]
    single = n_splits == 1  # one program per row and head writes the output: no merge launch
    part_o = q if single else torch.empty(B * H, n_splits, block_d, dtype=torch.float32, device=dev)
    part_lse = q if single else torch.empty(B * H, n_splits, dtype=torch.float32, device=dev)
    o_args = (o, o.stride(0), o.stride(1)) if o is not None else (q, 0, 0)
    proj_args, proj_flags, slices = project
    _decode_split_kernel[(B * H, n_splits, slices if single else 1)](
        q, k_cache, v_cache, lengths, part_o, part_lse, new_k, new_v, lengths if positions is None else positions,
        o_args[0], H, S, LOG2E / math.sqrt(D), q.stride(0), q.stride(1), *k_cache.stride()[:3],
        *v_cache.stride()[:3], new_k.stride(0), new_k.stride(1), new_v.stride(0), new_v.stride(1), *o_args[1:],
        *proj_args, *_no_qkv(q), HEAD_DIM=D, SPLIT_LEN=s["SPLIT_LEN"], BLOCK_N=s["BLOCK_N"], BLOCK_D=block_d,
        APPEND=new_kv is not None, SINGLE=single, num_warps=s["num_warps"], **pdl_options(dev),
        **(proj_flags if single else {}), BLOCK_C=s["BLOCK_C"], GROUP=s["GROUP"], RBLOCK=s["RBLOCK"])
    if not single:
        _decode_merge_kernel[(B * H, slices)](
            part_o, part_lse, lengths, *o_args[:1], H, S, *o_args[1:], n_splits, *proj_args[:10],
            HEAD_DIM=D, SPLIT_LEN=s["SPLIT_LEN"], BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_D=block_d,
            num_warps=s["num_warps"], **pdl_options(dev), **proj_flags, BLOCK_C=s["BLOCK_C"], GROUP=s["GROUP"],
            RBLOCK=s["RBLOCK"])
    return o if proj is None else residual


def projection_layout(H: int, N: int, slices: int, group: int) -> tuple[int, int, int]:
    """(partial rows, their width, counters) per (row, slice of W's outputs) of the fused output projection: H
    heads' partials and their groups' sums, N / slices wide (rounded up to 16, as the kernel rounds it); a
    counter per group and one for the groups."""
    groups = triton.cdiv(H, group)
    return H + groups, triton.cdiv(triton.cdiv(N, slices), 16) * 16, groups + 1


def _projection(proj, residual, counters, out, B: int, H: int, D: int, s: dict, dev, row_last: bool = False,
                more_counters: int = 0) -> tuple:
    """attention_decode's checks of proj = (W, bias, scale), residual and counters -> (the kernels' projection
    arguments, their flags, slices of W's outputs per row (programs (row, head, slice))); ValueError naming the
    problem. row_last (attention_block): the slices' results go through a (B, N) buffer, added into residual by
    each row's last slice (counters one per row more). The arguments end with the counters after the slices' (for
    row_last's, or more_counters more of the caller's own)."""
    if not (isinstance(proj, tuple) and len(proj) == 3):
        raise ValueError(f"proj must be a (weight, bias, scale) tuple, got {type(proj).__name__}")
    w, bias, scale = proj
    check_tensor("proj weight", w, 2, (*FLOAT_DTYPES, torch.int8), dev)
    N = w.shape[0]
    if w.shape[1] != H * D or N == 0 or not w.is_contiguous():
        raise ValueError(f"proj weight must be a contiguous (out, {H * D}) matrix (H * head_dim inputs), got "
                         f"{tuple(w.shape)}")
    check_scale("proj weight", w, scale, dev)
    if bias is not None:
        check_vector("proj bias", bias, N, (torch.float32,), dev)
    if out is not None:
        raise ValueError("attention_decode: with proj the attention output goes into residual; out must be None")
    if residual is None:
        raise ValueError("attention_decode: proj needs residual (B, out) fp32, the stream the projection adds into")
    check_out(residual, (B, N), torch.float32, dev, name="residual")
    slices = max(1, min(s["PROJ_SLICES"], triton.cdiv(N, 16)))
    part_rows, width, count_stride = projection_layout(H, N, slices, s["GROUP"])
    slice_counters = B * slices * count_stride
    counters = checked_counters(counters, slice_counters + (B if row_last else 0) + more_counters, dev,
                                "attention_decode")
    part = torch.empty(B * slices, part_rows, width, device=dev)  # the heads' partial sums (read within the launch)
    total = torch.empty(B, N, device=dev) if row_last else residual  # the slices' results (row_last)
    args = (w, w if scale is None else scale, w if bias is None else bias, residual, part, counters, N,
            residual.stride(0), part_rows, count_stride, total, counters[slice_counters:])
    # W's tiles pipelined where the attention leaves the registers for it (not in attention_block: its qkv GEMV
    # already takes ~180 registers; the attention with its projection, pipelined: 128, no spills at sm_90)
    flags = dict(PROJ=True, SCALED=scale is not None, HAS_BIAS=bias is not None,
                 PROJ_STAGES=1 if row_last else s["PROJ_STAGES"])
    return args, flags, slices


def _no_projection(q: torch.Tensor) -> tuple:
    """_projection's answer where PROJ is off: placeholders for the kernels' projection arguments (never read), no
    flags, one slice."""
    return (q,) * 6 + (0,) * 4 + (q, q), {}, 1


def _no_qkv(q: torch.Tensor) -> tuple:
    """Placeholders for _decode_split_kernel's qkv arguments (g, beta, W, scale, bias, eps) where QKV is off."""
    return (q,) * 5 + (1.0,)


def one_pass(batch: int, H: int, S: int, D: int, device: torch.device) -> bool:
    """Whether the decode attention reads a cache of S positions in one pass per (row, head) (no merge): the
    caches attention_block takes."""
    return decode_settings(batch * H, S, D, device)["n_splits"] == 1


def attention_block(r: torch.Tensor, norm: tuple, qkv: tuple, proj: tuple, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, *,
                    counters: torch.Tensor | None = None, shape: str = "fused",
                    qkv_out: torch.Tensor | None = None) -> torch.Tensor:
    """A decode step's whole pre-norm attention sub-layer in one launch: r += O W_o^T + b_o, O the heads of
    attention(q, k, v) side by side, (q, k, v) = LayerNorm(r) W_qkv^T + b_qkv (q, k and v side by side, H heads of
    D each), this step's k, v written into the caches at positions first (as write_kv). r (B, C) fp32, C = H * D,
    updated in place and returned; norm (g, beta, eps) over C; qkv (W_qkv (3C, C), bias (3C,) or None, scale (3C,)
    for int8 or None); proj (W_o (C, C), bias, scale) of W_qkv's dtype; caches (B, H, S, D) with S short enough
    for one pass (one_pass()); positions, lengths (B,) (lengths counting this step's position). Each (row, head,
    slice) program computes its head's q, k, v itself (the slices of a row repeat it: from L2) and its part of
    the projection; a row's last program adds the result into r (after every program of the row has read it).
    shape (utils.BLOCK_SHAPES; a GPU times them): "fused" as above; "wide", the qkv GEMV in wider steps on more warps;
    "spread", a head's q, k, v rows spread over several programs (none computes them twice), written to qkv_out
    ((B, 3C) fp32 scratch; a new one if None), the head's last program attending and projecting through all of
    W_o's outputs (utils.decode_settings)."""
    check_tensor("residual", r, 2, (torch.float32,), None)
    dev = r.device
    B, C = r.shape
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES, dev)
    _, H, S, D = k_cache.shape
    check_caches(k_cache, v_cache, B, H, D, dev, "residual")
    if H * D != C:
        raise ValueError(f"caches of {H} heads of {D} do not match a residual of width {C}")
    check_vector("positions", positions, B, (torch.int64, torch.int32), dev)
    check_vector("lengths", lengths, B, (torch.int64, torch.int32), dev)
    _check_norm(norm, C, dev)
    s = decode_settings(B * H, S, D, dev, shape=shape)
    if s["n_splits"] != 1:
        raise ValueError(f"attention_block takes caches read in one pass (one_pass()); {S} positions are not")
    spread = shape == "spread"
    # proj checked first (its residual, r, must be a contiguous (B, C): W_o has C outputs); spread: one slice of W_o's
    # outputs, a counter per (row, head) after the projection's
    proj_args, proj_flags, slices = _projection(proj, r, counters, None, B, H, D,
                                                dict(s, PROJ_SLICES=1) if spread else s, dev, row_last=not spread,
                                                more_counters=B * H if spread else 0)
    if not (isinstance(qkv, tuple) and len(qkv) == 3):
        raise ValueError(f"qkv must be a (weight, bias, scale) tuple, got {type(qkv).__name__}")
    wq, bq, sq = qkv
    check_tensor("qkv weight", wq, 2, (*FLOAT_DTYPES, torch.int8), dev)
    if tuple(wq.shape) != (3 * C, C) or not wq.is_contiguous():
        raise ValueError(f"qkv weight must be a contiguous ({3 * C}, {C}) matrix, got {tuple(wq.shape)}")
    if wq.dtype != proj[0].dtype:
        raise ValueError(f"proj weight ({proj[0].dtype}) and qkv weight ({wq.dtype}) must have one dtype")
    check_scale("qkv weight", wq, sq, dev)
    if bq is not None:
        check_vector("qkv bias", bq, 3 * C, (torch.float32,), dev)
    if spread:
        qkv_out = check_out(qkv_out, (B, 3 * C), torch.float32, dev, name="qkv_out")
    if B == 0:
        return r
    g, beta, eps = norm
    if spread:
        _attention_block_spread_kernel[(B * H, s["QKV_SLICES"])](
            r, k_cache, v_cache, lengths, positions, qkv_out, H, S, LOG2E / math.sqrt(D), *k_cache.stride()[:3],
            *v_cache.stride()[:3], *proj_args, g, beta, wq, wq if sq is None else sq, wq if bq is None else bq,
            float(eps), HEAD_DIM=D, BLOCK_N=s["BLOCK_N"], BLOCK_D=s["BLOCK_D"], **pdl_options(dev),
            SCALED=proj_flags["SCALED"], HAS_BIAS=proj_flags["HAS_BIAS"], BLOCK_C=s["BLOCK_C"], GROUP=s["GROUP"],
            RBLOCK=s["RBLOCK"], HAS_QKV_BIAS=bq is not None, NORM_BLOCK=_norm_block(norm, C, 1), QKV_ROWS=s["QKV_ROWS"],
            BLOCK_K=s["BLOCK_K"], QKV_STAGES=s["QKV_STAGES"], PROJ_STAGES=proj_flags["PROJ_STAGES"],
            num_warps=s["num_warps"])
        return r
    _decode_split_kernel[(B * H, 1, slices)](
        r, k_cache, v_cache, lengths, r, r, r, r, positions, r, H, S, LOG2E / math.sqrt(D), 0, 0,
        *k_cache.stride()[:3], *v_cache.stride()[:3], 0, 0, 0, 0, 0, 0, *proj_args, g, beta, wq,
        wq if sq is None else sq, wq if bq is None else bq, float(eps), HEAD_DIM=D, SPLIT_LEN=s["SPLIT_LEN"],
        BLOCK_N=s["BLOCK_N"], BLOCK_D=s["BLOCK_D"], APPEND=True, SINGLE=True, num_warps=s["num_warps"],
        **pdl_options(dev), **proj_flags, BLOCK_C=s["BLOCK_C"], GROUP=s["GROUP"], RBLOCK=s["RBLOCK"], QKV=True,
        HAS_QKV_BIAS=bq is not None, NORM_BLOCK=_norm_block(norm, C, 1), BLOCK_K=s["BLOCK_K"])
    return r


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, pos_ptr, kc_ptr, vc_ptr, H, S, k_sb, k_sh, v_sb, v_sh,
                     kc_sb, kc_sh, kc_ss, vc_sb, vc_sh, vc_ss, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     PDL: tl.constexpr):
    pdl_begin(PDL)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    pos = tl.load(pos_ptr + b)
    if (pos >= 0) & (pos < S):  # never outside the cache, whatever positions holds
        dims = tl.arange(0, BLOCK_D)
        in_d = dims < HEAD_DIM
        b64, h64 = b.to(tl.int64), h.to(tl.int64)
        k = tl.load(k_ptr + b64 * k_sb + h64 * k_sh + dims, mask=in_d)
        v = tl.load(v_ptr + b64 * v_sb + h64 * v_sh + dims, mask=in_d)
        tl.store(kc_ptr + b64 * kc_sb + h64 * kc_sh + pos * kc_ss + dims, cast_rne(k, kc_ptr.dtype.element_ty),
                 mask=in_d)
        tl.store(vc_ptr + b64 * vc_sb + h64 * vc_sh + pos * vc_ss + dims, cast_rne(v, vc_ptr.dtype.element_ty),
                 mask=in_d)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """A decode step's keys and values into the cache, in one launch: k_cache[b, :, positions[b]] = k[b] (and
    v), rounded to the cache's dtype (to nearest even). Caches (B, H, S, D) fp32 | bf16 | fp16 (e.g. views
    cache.k[layer]); k, v (B, H, D) fp32 (strided views of the qkv projection are fine); positions (B,) int
    on the device. A position outside [0, S) writes nothing."""
    check_tensor("k", k, 3, (torch.float32,), None, last_contiguous=True)
    dev = k.device
    B, H, D = k.shape
    check_new_kv(k, v, positions, B, H, D, dev)
    check_caches(k_cache, v_cache, B, H, D, dev, "k")
    if B * H == 0 or D == 0:
        return
    _write_kv_kernel[(B * H,)](
        k, v, positions, k_cache, v_cache, H, k_cache.shape[2], k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
        num_warps=1, **pdl_options(dev))


def check_new_kv(k, v, positions, B: int, H: int, D: int, device: torch.device) -> None:
    """A decode step's keys and values: k, v (B, H, D) fp32 (last dim contiguous), positions (B,) contiguous."""
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, 3, (torch.float32,), device, last_contiguous=True)
        if t.shape != (B, H, D):
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected ({B}, {H}, {D})")
    check_vector("positions", positions, B, (torch.int64, torch.int32), device)


def reference(q, k_cache, v_cache, lengths):
    """Plain-PyTorch fp32, row by row over exactly its first lengths[b] positions (nothing past them read)."""
    rows = []
    for b in range(q.shape[0]):
        n = int(lengths[b])
        k, v = k_cache[b, :, :n].float(), v_cache[b, :, :n].float()  # (H, n, D)
        scores = torch.einsum("hd,hnd->hn", q[b].float(), k) / math.sqrt(q.shape[-1])
        rows.append(torch.einsum("hn,hnd->hd", scores.softmax(dim=-1), v))
    return torch.stack(rows)
