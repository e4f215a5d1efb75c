"""Causal flash attention for prefill (online softmax; the T x T score matrix is never materialised).

    O[b, h, i] = sum_{j <= i} softmax_j(Q[b, h, i] . K[b, h, j] / sqrt(D)) V[b, h, j]

One program per (block of BLOCK_M queries, batch row x head). It walks the key blocks up to its diagonal,
keeping a running max m, normaliser l and unnormalised output acc:
    m' = max(m, rowmax(S)),  P = exp(S - m'),  l = l e^(m - m') + rowsum(P),  acc = acc e^(m - m') + P V
and writes acc / l. Exponentials are base 2 with log2(e) folded into the scale. q, k, v may be any strided
(B, H, T, D) views with a contiguous last dimension; D (head_dim) up to 256 is padded to a power of two.
fp32 inputs are multiplied in IEEE fp32; fp16/bf16 inputs use their native dot with fp32 accumulation (P is
rounded to the input dtype before P V, as in FlashAttention). Output: the input dtype.
Test: tests/test_triton_kernels.py (test_attention_prefill*); benchmark: bench/bench_triton.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import (FLOAT_DTYPES, INTERPRETER, MAX_HEAD_DIM, attention_settings, cast_rne, check_out, check_tensor,
                    dot_at)

LOG2E = 1.4426950408889634


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, T, H, qk_scale,
                      q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, o_sb, o_sh, o_st,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, WIDEN_DOT: tl.constexpr):
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M  # longest rows first
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    q_ptr += b.to(tl.int64) * q_sb + h.to(tl.int64) * q_sh
    k_ptr += b.to(tl.int64) * k_sb + h.to(tl.int64) * k_sh
    v_ptr += b.to(tl.int64) * v_sb + h.to(tl.int64) * v_sh
    o_ptr += b.to(tl.int64) * o_sb + h.to(tl.int64) * o_sh
    rows = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query positions
    dims = tl.arange(0, BLOCK_D)
    in_d = dims < HEAD_DIM
    q = tl.load(q_ptr + rows[:, None] * q_st + dims[None, :], mask=(rows[:, None] < T) & in_d[None, :],
                other=0.0)  # (BLOCK_M, BLOCK_D)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
        k = tl.load(k_ptr + cols[None, :] * k_st + dims[:, None], mask=(cols[None, :] < T) & in_d[:, None],
                    other=0.0)  # (BLOCK_D, BLOCK_N): K^T tile
        # fp32 q, k, v: six bf16 tensor-core dots each (utils.dot_fp32), an fp32 dot's result to rounding
        s = dot_at(q, k, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), WIDEN_DOT) * qk_scale
        s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))  # causal (and so cols < T for real rows)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is visible to every row
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + cols[:, None] * v_st + dims[None, :], mask=(cols[:, None] < T) & in_d[None, :],
                    other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = dot_at(p, v, acc * alpha[:, None], WIDEN_DOT)  # p rounded to a 16-bit v's dtype
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(o_ptr + rows[:, None] * o_st + dims[None, :], cast_rne(o, o_ptr.dtype.element_ty),
             mask=(rows[:, None] < T) & in_d[None, :])


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, out=None) -> torch.Tensor:
    """Causal attention, scale 1/sqrt(D). q, k, v (B, H, T, D) fp32/fp16/bf16 -> (B, H, T, D), q's dtype.
    q, k, v and out may have any strides with a contiguous last dimension."""
    check_tensor("q", q, 4, FLOAT_DTYPES, None, last_contiguous=True)
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, 4, (q.dtype,), q.device, last_contiguous=True)
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, q has {tuple(q.shape)}; they must match")
    B, H, T, D = q.shape
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    o = check_out(out, (B, H, T, D), q.dtype, q.device, strided=True)
    if o.numel() == 0:
        return o
    s = attention_settings(D, q.dtype)
    grid = (triton.cdiv(T, s["BLOCK_M"]), B * H)
    _attention_kernel[grid](q, k, v, o, T, H, LOG2E / math.sqrt(D),
                            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                            HEAD_DIM=D, WIDEN_DOT=INTERPRETER, **s)
    return o


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch fp32: softmax(Q K^T / sqrt(D) + causal mask) V, materialising the scores."""
    q, k, v = q.float(), k.float(), v.float()
    T, D = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, -math.inf).softmax(dim=-1) @ v
