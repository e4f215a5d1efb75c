"""Triton kernels (kernels/, installed as aigc_rt.kernels) vs their plain-PyTorch fp32 references: odd shapes,
every dtype, explicit (atol, rtol), the max error printed on failure; bad inputs raise ValueError.

Under TRITON_INTERPRET=1 (CI; tests/conftest.py sets it unless AIGC_RT_GPU is set) the kernels run on CPU
tensors at small shapes. With AIGC_RT_GPU=1 on a CUDA machine the same tests run on the GPU, adding real
GPT-2 shapes. test_kernels_compile_for_gpu compiles every kernel variant for sm_90 even without a GPU.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from aigc_rt.kernels import attention, decode_attention, layernorm, linear, sampling, utils
from aigc_rt.kernels.utils import INTERPRETER
from aigc_rt.sampling import SamplingParams, apply_repetition_penalty, filter_logits, uniform

ON_GPU = not INTERPRETER and torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
pytestmark = pytest.mark.skipif(not (INTERPRETER or ON_GPU),
                                reason="needs a CUDA GPU (AIGC_RT_GPU=1) or TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shapes(small: list, gpu: list) -> list:
    """The small (interpreter) shapes everywhere, plus real GPT-2 shapes on a GPU."""
    return small + gpu if ON_GPU else small


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.float() - want.float()).abs()
    bad = err > atol + rtol * want.float().abs()
    assert not bad.any(), (f"{what}: max abs error {err.max().item():.3g} (atol {atol}, rtol {rtol}), "
                           f"{int(bad.sum())} of {bad.numel()} elements out of tolerance")


def int8_weights(N: int, K: int, seeds: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int8 weights (N, K) and per-row scales that keep x q^T * scale O(1), as the converter writes them."""
    q = torch.randint(-127, 128, (N, K), generator=torch.Generator().manual_seed(seeds[0]), dtype=torch.int8)
    scale = (torch.rand(N, generator=torch.Generator().manual_seed(seeds[1])) + 0.5) / (127 * K ** 0.5)
    return q.to(DEV), scale.to(DEV)


def prenorm_operands(M: int, N: int, K: int, dtype: torch.dtype) -> tuple:
    """(x, w, scale, b, norm, r0) for a pre-norm block's linear: off-centre rows x (M, K), as the residual
    stream's are; weights (N, K) of `dtype` (int8 with its per-row scales, else scale None); bias (N,); a
    LayerNorm (g, beta, eps) over K; a residual r0 (M, N)."""
    x = randn(M, K, seed=M + N + K, scale=3) + 1
    g, beta, b = randn(K, seed=K + 1) + 1, randn(K, seed=K + 2), randn(N, seed=N)
    scale = None
    if dtype == torch.int8:
        w, scale = int8_weights(N, K, seeds=(K, N))
    else:
        w = randn(N, K, seed=K, scale=K ** -0.5, dtype=dtype)
    return x, w, scale, b, (g, beta, 1e-5), randn(M, N, seed=M * N)


# -- layernorm ------------------------------------------------------------------------------------------
LN_TOL = (1e-5, 1e-5)  # fp32 (the residual stream is always fp32)


@pytest.mark.parametrize("rows,C", shapes([(1, 1), (3, 17), (17, 111), (5, 500), (2, 1023), (4, 1600)],
                                          [(64, 1600), (4096, 768)]))
def test_layernorm(rows, C):
    x = randn(rows, C, seed=C, scale=3) + 1
    w, b = randn(C, seed=C + 2), randn(C, seed=C + 3)
    out = torch.empty_like(x)
    assert layernorm.layernorm(x, w, b, 1e-5, out=out) is out
    assert_close(out, layernorm.reference(x, w, b, 1e-5), *LN_TOL, f"layernorm ({rows}, {C})")


def test_layernorm_strided_rows():
    """x may be a row-strided view (last dimension contiguous), e.g. a slice of a wider buffer."""
    wide = randn(7, 300, seed=1)
    x = wide[:, 13:13 + 257]
    w, b = randn(257, seed=2), randn(257, seed=3)
    assert_close(layernorm.layernorm(x, w, b, 1e-5), layernorm.reference(x, w, b, 1e-5), *LN_TOL, "strided")


# -- linear ---------------------------------------------------------------------------------------------
# Both sides see the same operands (x rounded to the weight dtype) and accumulate in fp32, so every weight
# dtype gets the fp32 tolerance; outputs are O(1) (weights scaled by 1/sqrt(K)).
LINEAR_TOL = (1e-4, 1e-4)


@pytest.mark.parametrize("M,N,K", shapes([(1, 17, 3), (1, 500, 111), (2, 111, 500), (17, 33, 1023),
                                          (40, 70, 129)],
                                         [(1, 2304, 768), (8, 3072, 768), (1, 50257, 768), (8, 1600, 6400),
                                          (512, 3072, 768)]))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_linear(M, N, K, dtype):
    x = randn(M, K, seed=M * N + K)
    w = randn(N, K, seed=K, scale=K ** -0.5, dtype=dtype)
    b = randn(N, seed=N)
    for bias, act in ((b, "gelu_tanh"), (None, None), (b, "relu")):
        want = linear.reference(x, w, bias, act)
        assert_close(linear.linear(x, w, bias, act), want, *LINEAR_TOL, f"linear {M}x{N}x{K} {dtype} {act}")
        # both kernels at any row count: the GEMM at M = 1, the GEMV over several rows
        other = "gemm" if M == 1 else "gemv"
        assert_close(linear.linear(x, w, bias, act, kernel=other), want, *LINEAR_TOL,
                     f"linear ({other}) {M}x{N}x{K} {dtype} {act}")


@pytest.mark.parametrize("M,N,K", shapes([(1, 17, 2), (1, 37, 130), (3, 70, 320), (20, 33, 96)],
                                         [(1, 2304, 768), (8, 6400, 1600), (1, 1600, 6400), (40, 3072, 768)]))
def test_linear_int4(M, N, K):
    """int4 weights as the file holds them (format.quantize_int4: nibble pairs, a scale per row and group of 64
    inputs; K = 130 ends in a group of 2): the int4 GEMV up to 16 rows, a bf16 dequantised weight beyond, against
    x times the dequantised fp32 weight, fused as the model runs it (LayerNorm prologue, GELU, residual add)."""
    from aigc_rt.format import dequantize_int4, quantize_int4
    x, b, r = randn(M, K, seed=M + K), randn(N, seed=N), randn(M, N, seed=K)
    w, scale = quantize_int4(randn(N, K, seed=K * N, scale=K ** -0.5))
    w, scale = w.to(DEV), scale.to(DEV)
    norm = (randn(K, seed=1) + 1, randn(K, seed=2), 1e-5)
    wf = dequantize_int4(w, scale)
    tol = LINEAR_TOL if M <= linear.PICKED_MAX_M else (2e-2, 2e-2)  # beyond: x and the weight rounded to bf16
    for bias, act, fused in ((b, "gelu_tanh", {}), (None, None, dict(norm=norm)), (b, "relu", dict(residual=r))):
        want = linear.reference(x, wf, bias, act, **fused)
        got = linear.linear_int4(x, w, scale, bias, act, **{k: v.clone() if k == "residual" else v
                                                            for k, v in fused.items()})
        assert_close(got, want, *tol, f"linear int4 {M}x{N}x{K} {act} {list(fused)}")
    with pytest.raises(ValueError, match=r"int4 scale has shape \(\d+, \d+\); expected"):
        linear.linear_int4(x, w, scale[:, :1].contiguous() if scale.shape[1] > 1 else scale[:1])


def test_every_int4_candidate():
    """Each block shape the int4 GEMV's autotuner may pick (pipelined ones too), launched directly, with the
    LayerNorm prologue, GELU and the residual add: K = 1100 (a last group of 12 inputs) keeps every K block."""
    from aigc_rt.format import dequantize_int4, quantize_int4
    M, N, K = 2, 37, 1100
    x, b, r = randn(M, K, seed=3), randn(N, seed=4), randn(M, N, seed=5)
    w, scale = quantize_int4(randn(N, K, seed=6, scale=K ** -0.5))
    w, scale = w.to(DEV), scale.to(DEV)
    g, beta = randn(K, seed=7, scale=0.2) + 1, randn(K, seed=8, scale=0.2)
    want = linear.reference(x, dequantize_int4(w, scale), b, "gelu_tanh", norm=(g, beta, 1e-5), residual=r)
    configs = linear._no_wider_than_k(linear._gemv_int4_tuned.configs, dict(K=K))
    assert len(configs) == len(linear._GEMV_INT4_CONFIGS) and any(c.kwargs["STAGES"] > 1 for c in configs)
    for c in configs:
        y = r.clone()
        linear._gemv_int4_kernel[(triton.cdiv(N, c.kwargs["BLOCK_N"]), M)](
            x, w, scale, b, y, g, beta, N, K, K, K // 2, scale.shape[1], N, 1e-5, HAS_BIAS=True, GELU=True,
            NORM=True, NORM_BLOCK=linear._norm_block((g,), K, 1), ACCUMULATE=True, PDL=False, **c.kwargs,
            num_warps=c.num_warps)
        assert_close(y, want, *LINEAR_TOL, f"int4 candidate {c.kwargs} warps {c.num_warps}")


@pytest.mark.parametrize("M,N,K", shapes([(1, 17, 3), (1, 500, 111), (3, 111, 500), (17, 33, 1023)],
                                         [(1, 2304, 768), (8, 3072, 768), (1, 50257, 768), (512, 3072, 768)]))
def test_linear_int8(M, N, K):
    """Weight-only int8 (per-row scales, as `aigc-rt convert --dtype int8` writes): the kernel sums x q in fp32
    and scales after; the reference dequantises first, so they differ by fp32 rounding only."""
    x, b = randn(M, K, seed=M + K), randn(N, seed=N)
    q, scale = int8_weights(N, K, seeds=(K, N))
    for bias, act in ((b, "gelu_tanh"), (None, None), (b, "relu")):
        want = linear.reference(x, q, bias, act, scale=scale)
        for kernel in ("gemv", "gemm"):
            assert_close(linear.linear(x, q, bias, act, scale=scale, kernel=kernel), want, *LINEAR_TOL,
                         f"linear int8 ({kernel}) {M}x{N}x{K} {act}")
    with pytest.raises(ValueError, match="scale is required for int8"):
        linear.linear(x, q)
    with pytest.raises(ValueError, match="scale must be a contiguous"):
        linear.linear(x, q, scale=scale[:-1] if N > 1 else scale.repeat(2))


# LayerNorm in the prologue rounds its own (fp32) output to the weight dtype: where that rounding falls on the other
# side of a bf16 / fp16 step than the reference's, one product moves by |w| * ulp (weights ~ 1/sqrt(K), x ~ 4)
NORM_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-3, 5e-3), torch.float16: (1e-3, 1e-3)}


@pytest.mark.parametrize("M,N,K", shapes([(1, 17, 3), (1, 130, 111), (2, 111, 300), (17, 33, 1023), (40, 70, 129)],
                                         [(1, 2304, 768), (8, 6400, 1600)]))  # (few: each compiles ~70 variants)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.int8], ids=["fp32", "bf16", "fp16", "int8"])
def test_linear_norm_and_residual(M, N, K, dtype):
    """The pre-norm fusions: y = linear(LayerNorm(x)) (norm in the prologue) and residual += linear(x) (in the
    epilogue), alone and together, on both kernels (and the split-K GEMM, whose reduction does the adding)."""
    x, w, scale, b, norm, r0 = prenorm_operands(M, N, K, dtype)
    tol = NORM_TOL.get(dtype, LINEAR_TOL)
    for kernel, split_k in (("gemv", None), ("gemm", None), ("gemm", 3)):
        what = f"{M}x{N}x{K} {dtype} {kernel} split_k={split_k}"
        want = linear.reference(x, w, b, "gelu_tanh", scale=scale, norm=norm)
        got = linear.linear(x, w, b, "gelu_tanh", scale=scale, norm=norm, kernel=kernel, split_k=split_k)
        assert_close(got, want, *tol, f"linear(LayerNorm(x)) {what}")
        r = r0.clone()
        want = linear.reference(x, w, b, scale=scale, residual=r0)
        assert linear.linear(x, w, b, scale=scale, residual=r, kernel=kernel, split_k=split_k) is r
        assert_close(r, want, *LINEAR_TOL, f"residual += linear(x) {what}")
        r = r0.clone()
        linear.linear(x, w, None, scale=scale, norm=norm, residual=r, kernel=kernel, split_k=split_k)
        assert_close(r, linear.reference(x, w, None, scale=scale, norm=norm, residual=r0), *tol,
                     f"residual += linear(LayerNorm(x)) {what}")


def test_linear_norm_and_residual_errors():
    x, w = randn(3, 8, seed=1), randn(5, 8, seed=2)
    ones, zeros = torch.ones(8, device=DEV), torch.zeros(8, device=DEV)
    cases = [
        (dict(norm=(ones, zeros)), "norm must be a"),
        (dict(norm=(ones[:7], zeros, 1e-5)), r"norm weight must be a contiguous \(8,\)"),
        (dict(norm=(ones, zeros.double(), 1e-5)), "norm bias must be one of"),
        (dict(norm=(ones, zeros, 0.0)), "norm eps must be > 0"),
        (dict(residual=torch.zeros(3, 4, device=DEV)), r"residual must be a contiguous \(3, 5\)"),
        (dict(residual=torch.zeros(5, 3, device=DEV).t()), "residual must be a contiguous"),
        (dict(residual=torch.zeros(3, 5, device=DEV), out=torch.zeros(3, 5, device=DEV)), "out or residual"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            linear.linear(x, w, **kwargs)
    buf = torch.zeros(39, device=DEV)  # x (3 rows of 8, strided by 13) and a residual (3, 5) in one buffer
    with pytest.raises(ValueError, match="residual must not overlap x"):
        linear.linear(buf.view(3, 13)[:, :8], w, residual=buf[20:35].view(3, 5))


@pytest.mark.parametrize("split_k", [2, 3, 7])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_linear_split_k(split_k, dtype):
    """The GEMM with K split over programs (partial sums + an in-order reduction with the epilogue): K = 500
    leaves a short last split (and at 7 splits of whole 64-wide blocks an empty one); bias, GELU and int8
    scales are applied once, after the sum; the result is the same every run."""
    M, N, K = 3, 45, 500
    x, b = randn(M, K, seed=21), randn(N, seed=22)
    scale = None
    if dtype == "int8":
        w, scale = int8_weights(N, K, seeds=(23, 24))
    else:
        w = randn(N, K, seed=23, scale=K ** -0.5, dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dtype]))
    for bias, act in ((b, "gelu_tanh"), (None, None), (b, "relu")):
        want = linear.reference(x, w, bias, act, scale=scale)
        got = linear.linear(x, w, bias, act, scale=scale, kernel="gemm", split_k=split_k)
        assert_close(got, want, *LINEAR_TOL, f"linear split_k={split_k} {dtype} {act}")
        assert torch.equal(linear.linear(x, w, bias, act, scale=scale, kernel="gemm", split_k=split_k), got)
    with pytest.raises(ValueError, match="split_k must be None or an int"):
        linear.linear(x, w, scale=scale, split_k=0)


@pytest.mark.skipif(ON_GPU, reason="on a GPU test_triton_model runs the real PDL launches")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_gemv_pdl_and_prefetch_variants_compute_the_same(dtype, monkeypatch):
    """With PDL the GEMV requests each weight block one iteration ahead (the first before the wait); with
    PREFETCH a program first asks L2 for all its rows (the last program for fewer than BLOCK_N). Run those paths
    in the interpreter, the wait and the prefetch themselves stubbed or no-ops (their instructions exist only on
    a GPU): bitwise the plain loop's result, for K shorter than, equal to and not a multiple of the block."""
    monkeypatch.setattr(linear, "pdl_begin", lambda PDL: None)
    for K in (3, 256, 500):
        N = 37
        x, b = randn(2, K, seed=K), randn(N, seed=N)
        scale = None
        if dtype == "int8":
            w, scale = int8_weights(N, K, (K, 1))
        else:
            w = randn(N, K, seed=K + 1, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
        ys = []
        for pdl, prefetch in ((False, False), (True, False), (False, True), (True, True)):
            y = torch.empty(2, N)
            linear._gemv_kernel[(triton.cdiv(N, 4), 2)](
                x, w, w if scale is None else scale, b, y, x, x, N, K, K, K, N, 1.0, SCALED=scale is not None,
                HAS_BIAS=True, GELU=True, NORM=False, NORM_BLOCK=16, ACCUMULATE=False, BLOCK_N=4, BLOCK_K=256,
                PREFETCH=prefetch, PDL=pdl)
            ys.append(y)
        for y in ys[1:]:
            assert torch.equal(ys[0], y), f"K={K}: max diff {(ys[0] - y).abs().max():.3g}"
        assert_close(ys[1], linear.reference(x, w, b, "gelu_tanh", scale=scale), *LINEAR_TOL, f"gemv pdl K={K}")


@pytest.mark.parametrize("split_k", [1, 4])
def test_gemm_prefetch_variant_computes_the_same(split_k):
    """The 16-row GEMM with PREFETCH (its rows of W over its K range asked of L2 first; a no-op here) gives
    bitwise the plain kernel's result, also with a split whose K range is empty (K = 1100 in 4 splits of 384)."""
    M, N, K = 5, 37, 1100
    x, w, b = randn(M, K, seed=1), randn(N, K, seed=2, dtype=torch.bfloat16), randn(N, seed=3)
    ys = []
    for prefetch in (False, True):
        y = torch.empty(M, N)
        part = torch.empty(split_k, M, N) if split_k > 1 else y
        flags = dict(SCALED=False, HAS_BIAS=True, GELU=True, NORM=False, ACCUMULATE=False, PDL=False)
        linear._linear_kernel[(triton.cdiv(N, 16), 1, split_k)](
            x, w, w, b, y, part, x, x, M, N, K, K, K, N, 1.0, **flags, NORM_BLOCK=16, WIDEN_DOT=True, BLOCK_M=16,
            BLOCK_N=16, BLOCK_K=128, SPLIT_K=split_k, PREFETCH=prefetch)
        linear._split_k_reduce(dict(part_ptr=part, SPLIT_K=split_k, s_ptr=w, b_ptr=b, y_ptr=y, M=M, N=N,
                                    y_stride=N, **flags))
        ys.append(y)
    assert torch.equal(ys[0], ys[1]), f"max diff {(ys[0] - ys[1]).abs().max():.3g}"
    assert_close(ys[1], linear.reference(x, w, b, "gelu_tanh"), *LINEAR_TOL, f"gemm prefetch split_k={split_k}")


@pytest.mark.skipif(ON_GPU, reason="a GPU runs its own settings in every test")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_linear_with_the_gpu_settings(gpu_settings, dtype):
    """The fixed block shapes a GPU takes without autotuning (AIGC_RT_AUTOTUNE=0) and for prefill (64- and
    128-row GEMM tiles, K blocks of 32), under the interpreter: a GEMV row, a batched-decode tile, a prefill."""
    N, K = 333, 300
    if dtype == "int8":
        w, scale = int8_weights(N, K, (1, 2))
    else:
        w, scale = randn(N, K, seed=1, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16), None
    b = randn(N, seed=3)
    for M in (1, 5, 70, 200):
        x = randn(M, K, seed=M)
        assert_close(linear.linear(x, w, b, "gelu_tanh", scale=scale), linear.reference(x, w, b, "gelu_tanh", scale),
                     *LINEAR_TOL, f"linear {M}x{N}x{K} {dtype}")


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_every_autotune_candidate(kernel):
    """Each block shape the autotuners may pick (which one a GPU picks depends on its timings), launched directly:
    all give the reference's result, bf16 weights with bias and GELU, and int8 weights with the LayerNorm prologue
    and the residual epilogue. On a GPU: the candidates kept for this shape (the L2-prefetching ones on Hopper);
    under the interpreter all of them (K = 1100: every K block width, and a split-K split left empty)."""
    M = 1 if kernel == "gemv" else 5
    N, K = (333, 1600) if ON_GPU else (37, 1100)
    tuned = linear._gemv_tuned if kernel == "gemv" else linear._small_m_tuned
    x, r = randn(M, K, seed=1), randn(M, N, seed=2)
    g, beta = randn(K, seed=3, scale=0.2) + 1, randn(K, seed=4, scale=0.2)
    cases = [(randn(N, K, seed=5, dtype=torch.bfloat16), None, randn(N, seed=6), dict(GELU=True)),
             (*int8_weights(N, K, (7, 8)), None, dict(NORM=True, ACCUMULATE=True))]
    for w, scale, b, on in cases:
        configs = (linear._candidates if ON_GPU else linear._no_wider_than_k)(tuned.configs, dict(w_ptr=w, K=K))
        if ON_GPU and torch.cuda.get_device_capability()[0] >= 9:
            assert any(c.kwargs["PREFETCH"] for c in configs), "no L2-prefetching candidate kept on Hopper"
        flags = {**dict(SCALED=scale is not None, HAS_BIAS=b is not None, GELU=False, NORM=False, ACCUMULATE=False,
                        PDL=False), **on}
        want = linear.reference(x, w, b, "gelu_tanh" if flags["GELU"] else None, scale=scale,
                                norm=(g, beta, 1e-5) if flags["NORM"] else None,
                                residual=r if flags["ACCUMULATE"] else None)
        for c in configs:
            y = r.clone() if flags["ACCUMULATE"] else torch.empty(M, N, device=DEV)
            args = (x, w, w if scale is None else scale, w if b is None else b, y)
            if kernel == "gemv":
                linear._gemv_kernel[linear.gemv_grid(N, M, DEV)(c.kwargs)](
                    *args, g, beta, N, K, K, K, N, 1e-5, **flags, NORM_BLOCK=linear._norm_block((g,), K, 1),
                    **c.kwargs, num_warps=c.num_warps)
            else:
                sk = c.kwargs["SPLIT_K"]
                part = torch.empty(sk, M, N, device=DEV)
                linear._linear_kernel[(triton.cdiv(N, c.kwargs["BLOCK_N"]), 1, sk)](
                    *args, part, g, beta, M, N, K, K, K, N, 1e-5, **flags,
                    NORM_BLOCK=linear._norm_block((g,), K, 16), WIDEN_DOT=INTERPRETER, **c.kwargs,
                    num_warps=c.num_warps, num_stages=c.num_stages)
                linear._split_k_reduce(dict(part_ptr=part, SPLIT_K=sk, s_ptr=args[2], b_ptr=args[3], y_ptr=y, M=M,
                                            N=N, y_stride=N, **flags))
            assert_close(y, want, *LINEAR_TOL, f"{kernel} {w.dtype} {on} {c.kwargs} warps {c.num_warps}")


@pytest.mark.parametrize("w_dtype", ["bf16", "int8", "fp32"])
@pytest.mark.parametrize("M,programs", [(1, 1), (1, 3), (3, 2), (2, 64)])
def test_persistent_gemv(w_dtype, M, programs):
    """The GEMV's PERSISTENT form: `programs` programs per row of x, each taking row blocks programs apart and
    requesting the next before the current one's sums (the last one's request masked off), with the LayerNorm
    prologue, bias, GELU and the residual epilogue; a row of K = 300 in one 512-wide block, N = 37 in blocks of 4
    (10 blocks; gemv_grid launches no more programs than that)."""
    N, K, BLOCK_N = 37, 300, 4
    x, r, b = randn(M, K, seed=1), randn(M, N, seed=2), randn(N, seed=3)
    g, beta = randn(K, seed=4, scale=0.2) + 1, randn(K, seed=5, scale=0.2)
    if w_dtype == "int8":
        w, scale = int8_weights(N, K, (6, 7))
    else:
        w, scale = randn(N, K, seed=6, dtype=torch.bfloat16 if w_dtype == "bf16" else torch.float32), None
    want = linear.reference(x, w, b, "gelu_tanh", scale=scale, norm=(g, beta, 1e-5), residual=r)
    y = r.clone()
    blocks = min(programs, triton.cdiv(N, BLOCK_N))
    linear._gemv_kernel[(blocks, M)](
        x, w, w if scale is None else scale, b, y, g, beta, N, K, K, K, N, 1e-5, SCALED=scale is not None,
        HAS_BIAS=True, GELU=True, NORM=True, NORM_BLOCK=linear._norm_block((g,), K, 1), ACCUMULATE=True,
        BLOCK_N=BLOCK_N, BLOCK_K=512, PREFETCH=False, PDL=False, PERSISTENT=2, num_warps=4)
    assert_close(y, want, *LINEAR_TOL, f"persistent GEMV, {w_dtype}, M {M}, {blocks} programs")
    grid = linear.gemv_grid(N, M, DEV)
    assert grid(dict(BLOCK_N=BLOCK_N, PERSISTENT=0)) == (10, M)
    assert grid(dict(BLOCK_N=BLOCK_N, PERSISTENT=64)) == (10, M), "more programs than row blocks"


def test_autotune_candidates_for_gpt2_shapes():
    """The block shapes the autotuners try: K blocks up to the row's width rounded up to a power of two (wider
    ones only add masked lanes), and splits of at least two K blocks each. 124M's K = 768 keeps the GEMV's 512-
    and 1024-wide blocks (the H200 run of 2026-11-29 chose 1024 for its qkv), drops 2048, and keeps the
    pipelined 256- and 512-wide ones."""
    def kept(tuned, K):
        return {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs.get("SPLIT_K", 1), c.num_warps)
                for c in linear._no_wider_than_k(tuned.configs, dict(K=K))}
    gemv = kept(linear._gemv_tuned, 768)
    assert {k for _, k, _, _ in gemv} == {256, 512, 1024} and (8, 1024, 1, 8) in gemv  # 256: pipelined ones
    def blocks(K, form):
        return [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in linear._no_wider_than_k(
            linear._gemv_tuned.configs, dict(K=K)) if c.kwargs.get(form, 0) > (form == "STAGES")]
    persistent = {K: blocks(K, "PERSISTENT") for K in (768, 1600, 3072, 6400)}
    pipelined = blocks(768, "STAGES")
    assert len(linear._no_wider_than_k(linear._gemv_tuned.configs, dict(K=768))) == (
        len(linear._GEMV_CONFIGS) - 1 + len(persistent[768]) + len(pipelined))
    assert {k for _, k, _, _ in kept(linear._gemv_tuned, 6400)} == {256, 512, 1024, 2048}
    # the PERSISTENT form takes a row in one block: 124M's rows (768, and mlp_proj's 3072) and 1.5B's 1600
    assert persistent[768] == [(4, 1024), (8, 1024), (8, 1024)] and persistent[6400] == []
    assert {k for _, k in persistent[1600]} == {2048} and {k for _, k in persistent[3072]} == {4096}
    # a pipelined K loop needs two blocks or more: at K = 768 the 256- and 512-wide ones
    assert {k for _, k in pipelined} == {256, 512} and (8, 1024) in blocks(1600, "STAGES")
    gemm = kept(linear._small_m_tuned, 768)
    assert all(s == 1 or 768 >= 2 * s * k for _, k, s, _ in gemm) and (32, 128, 2, 4) in gemm
    assert (16, 128, 4, 4) not in gemm and (16, 128, 4, 4) in kept(linear._small_m_tuned, 1600)


@pytest.mark.skipif(ON_GPU, reason="on a GPU the autotuners time the candidates for real (test_linear*)")
@pytest.mark.parametrize("kernel,winner", [("gemv", dict(BLOCK_N=16, BLOCK_K=1024)), ("gemm", dict(SPLIT_K=4)),
                                           ("gemm", dict(BLOCK_N=64, SPLIT_K=1))])
def test_autotuned_launch(monkeypatch, kernel, winner):
    """linear() as a GPU runs it (AIGC_RT_AUTOTUNE on: every candidate timed once, the fastest launched; for the
    GEMM, its split-K reduction after), here with a timer that makes the first candidate matching `winner` the
    fastest. Into a residual: the timed runs must leave the residual stream as it was."""
    monkeypatch.setattr(linear, "AUTOTUNE", True)
    tuned = linear._gemv_tuned if kernel == "gemv" else linear._small_m_tuned
    M, N, K = (1 if kernel == "gemv" else 5), 37, 1100
    x, w, b, r = randn(M, K, seed=1), randn(N, K, seed=2, dtype=torch.bfloat16), randn(N, seed=3), randn(M, N, seed=4)
    order = linear._candidates(tuned.configs, dict(w_ptr=w, K=K))  # the autotuner times them in this order
    pick = next(i for i, c in enumerate(order) if winner.items() <= c.kwargs.items())
    timed = []

    def timer(fn, quantiles=None):
        fn()
        timed.append(len(timed))
        t = 0.0 if timed[-1] == pick else 1.0
        return [t, t, t] if quantiles else t
    monkeypatch.setattr(tuned, "do_bench", timer)  # (a cached_property of the autotuner)
    monkeypatch.setattr(tuned, "cache_results", False)
    monkeypatch.setattr(tuned, "cache", {})
    got = linear.linear(x, w, b, "gelu_tanh", norm=(torch.ones(K), torch.zeros(K), 1e-5), residual=r.clone(),
                        kernel=kernel)  # (at M = 5 unforced, the pick between the two would time both)
    assert len(timed) == len(order) and tuned.best_config is order[pick]
    want = linear.reference(x, w, b, "gelu_tanh", norm=(torch.ones(K), torch.zeros(K), 1e-5), residual=r)
    assert_close(got, want, *LINEAR_TOL, f"autotuned {kernel} won by {order[pick]}")


@pytest.mark.skipif(ON_GPU, reason="on a GPU the pick times the kernels for real (test_linear*)")
@pytest.mark.parametrize("faster", ["gemv", "gemm"])
def test_small_batch_launch_takes_the_faster_kernel(monkeypatch, faster):
    """linear() on 2-16 rows as a GPU runs it: both kernels timed once per shape (each autotuned), the faster
    launched then and remembered; the timed runs leave the residual stream as it was. Here with timers that make
    `faster` the faster kernel and the first candidate of each autotuner its best."""
    monkeypatch.setattr(linear, "AUTOTUNE", True)
    monkeypatch.setattr(linear, "_picked", {})
    for tuned in (linear._gemv_tuned, linear._small_m_tuned):
        monkeypatch.setattr(tuned, "do_bench", lambda fn, quantiles=None: (fn(), [1.0] * 3 if quantiles else 1.0)[1])
        monkeypatch.setattr(tuned, "cache_results", False)
        monkeypatch.setattr(tuned, "cache", {})
    timed = []

    def timer(fn, quantiles):
        fn()
        timed.append(len(timed))
        return 1.0 if ("gemm", "gemv")[len(timed) - 1] == faster else 2.0  # _faster times the GEMM first
    monkeypatch.setattr(linear, "_quick_bench", timer)
    M, N, K = 5, 37, 260
    x, w, b, r = randn(M, K, seed=1), randn(N, K, seed=2, dtype=torch.bfloat16), randn(N, seed=3), randn(M, N, seed=4)
    norm = (torch.ones(K), torch.zeros(K), 1e-5)
    launched = []
    for kernel, tuned in (("gemv", linear._gemv_tuned), ("gemm", linear._small_m_tuned)):
        def run(*args, tuned=tuned, kernel=kernel, **kwargs):
            launched.append(kernel)
            return type(tuned).run(tuned, *args, **kwargs)
        monkeypatch.setattr(tuned, "run", run)
    for _ in range(2):
        launched.clear()
        got = linear.linear(x, w, b, "gelu_tanh", norm=norm, residual=r.clone())
        want = linear.reference(x, w, b, "gelu_tanh", norm=norm, residual=r)
        assert_close(got, want, *LINEAR_TOL, f"the pick ({faster} faster)")
        assert launched[-1] == faster
    assert len(timed) == 2 and launched == [faster], "the pick was not remembered"
    assert linear._picked == {(M, N, K, torch.bfloat16, True): faster}


def test_prefetch_candidates(monkeypatch):
    """The autotuners try the L2-prefetching shapes only where the prefetch may run (never on a CPU tensor) and a
    program's weights take at most PREFETCH_MAX_BYTES (resident programs x that must fit in L2): its rows, over
    its share of K for a split-K GEMM."""
    w = torch.empty(16, 6400, dtype=torch.bfloat16)  # rows of 12,800 bytes: 8 fit in 128 KiB, 16 do not
    named = dict(w_ptr=w, K=6400)

    def prefetching(tuned):
        return {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs.get("SPLIT_K", 1))
                for c in linear._candidates(tuned.configs, named) if c.kwargs["PREFETCH"]}
    assert prefetching(linear._gemv_tuned) == prefetching(linear._small_m_tuned) == set()
    monkeypatch.setattr(linear, "l2_prefetchable", lambda t, row_bytes: True)
    assert prefetching(linear._gemv_tuned) == {(4, 1024, 1), (8, 512, 1), (8, 1024, 1)}
    assert prefetching(linear._small_m_tuned) == {(16, 128, 4), (32, 128, 4)}  # 32 or 64 whole rows: too many
    assert linear.PREFETCH_MAX_BYTES == 128 << 10


def test_linear_leading_dims_and_out():
    x = randn(2, 3, 65, seed=4)  # (B, T, K)
    w, b = randn(31, 65, seed=5, scale=0.1), randn(31, seed=6)
    out = torch.empty(2, 3, 31, device=DEV)
    got = linear.linear(x, w, b, "gelu_tanh", out=out)
    assert got is out
    assert_close(got, linear.reference(x, w, b, "gelu_tanh"), *LINEAR_TOL, "linear (2, 3, 65)")


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # exp(2a) -> inf is the intended saturation
def test_gelu_saturates():
    """GELU-tanh at large |y| (tanh through exp overflows to inf there): y for y >> 0, 0 for y << 0."""
    x = torch.tensor([[1.0]], device=DEV)
    w = torch.tensor([[-200.0], [-20.0], [-1e-3], [0.0], [1e-3], [3.0], [20.0], [200.0]], device=DEV)
    got = linear.linear(x, w, None, "gelu_tanh")
    want = linear.reference(x, w, None, "gelu_tanh")
    assert torch.isfinite(got).all()
    assert_close(got, want, 1e-6, 1e-6, "gelu at large |y|")


# -- prefill attention -------------------------------------------------------------------------------------
ATTN_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}


@pytest.mark.parametrize("B,H,T,D", shapes([(1, 1, 1, 64), (2, 3, 17, 80), (1, 2, 33, 96), (1, 1, 40, 128),
                                            (2, 1, 19, 32), (1, 1, 5, 7), (1, 1, 9, 200)],
                                           [(1, 12, 1024, 64), (4, 25, 333, 64), (2, 20, 500, 80),
                                            (1, 16, 257, 96), (2, 8, 300, 128)]))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_attention_prefill(B, H, T, D, dtype):
    """q, k, v as the model makes them: (B, T, H, D) buffers viewed as (B, H, T, D)."""
    q, k, v = (randn(B, T, H, D, seed=i + T, dtype=dtype).transpose(1, 2) for i in range(3))
    got = attention.attention_prefill(q, k, v)
    assert got.dtype == dtype
    assert_close(got, attention.reference(q, k, v), *ATTN_TOL[dtype], f"attention ({B}, {H}, {T}, {D}) {dtype}")


def test_attention_prefill_out():
    q, k, v = (randn(1, 2, 9, 16, seed=i) for i in range(3))
    out = torch.empty_like(q)
    assert attention.attention_prefill(q, k, v, out=out) is out
    assert_close(out, attention.reference(q, k, v), *ATTN_TOL[torch.float32], "attention out=")
    strided = torch.full((1, 9, 2, 16), float("nan"), device=DEV).transpose(1, 2)  # (B, T, H, D) viewed as BHTD
    assert attention.attention_prefill(q, k, v, out=strided) is strided
    assert_close(strided, attention.reference(q, k, v), *ATTN_TOL[torch.float32], "attention strided out=")


@pytest.mark.skipif(ON_GPU, reason="a GPU runs its own settings in every test")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_attention_with_the_gpu_settings(gpu_settings, dtype):
    """Prefill attention in a GPU's tiles (64 or 128 query rows by 32 or 64 keys: the causal boundary inside a
    tile, a partial last tile) and decode attention in its blocks of 64 positions (one pass up to 256, split
    beyond, ragged lengths), under the interpreter."""
    for B, H, T, D in ((1, 2, 200, 64), (1, 1, 130, 80), (2, 1, 70, 128)):
        q, k, v = (randn(B, T, H, D, seed=i + T, dtype=dtype).transpose(1, 2) for i in range(3))
        assert_close(attention.attention_prefill(q, k, v), attention.reference(q, k, v), *ATTN_TOL[dtype],
                     f"prefill ({B}, {H}, {T}, {D}) {dtype}")
    for B, H, S, D, lengths in ((2, 2, 200, 64, [200, 7]), (3, 2, 700, 80, [1, 300, 700])):
        lens = torch.tensor(lengths, device=DEV)
        k_cache, v_cache = (randn(B, H, S, D, seed=i + S, dtype=dtype) for i in range(2))
        q = randn(B, H, D, seed=7, dtype=dtype)
        assert_close(decode_attention.attention_decode(q, k_cache, v_cache, lens, S),
                     decode_attention.reference(q, k_cache, v_cache, lens), *ATTN_TOL[dtype],
                     f"decode ({B}, {H}, {S}, {D}) lengths {lengths} {dtype}")


# -- decode attention -------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,H,S,D,lengths", shapes(
    [(1, 1, 1, 64, [1]), (2, 2, 37, 80, [1, 37]), (1, 3, 70, 96, [70]), (3, 1, 33, 128, [33, 5, 17]),
     (2, 1, 50, 32, [49, 18])],
    [(1, 12, 1024, 64, [1000]), (8, 25, 1024, 64, [1, 17, 100, 333, 512, 777, 1000, 1024]),
     (4, 20, 1024, 80, [5, 1024, 300, 64])]))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_attention_decode(B, H, S, D, lengths, dtype):
    """Ragged lengths; cache slots at/after a row's length hold NaN and must never be read; q is a strided
    view of a fused qkv buffer (as in the model); the result does not depend on max_len."""
    lens = torch.tensor(lengths, device=DEV)
    k_cache = torch.full((B, H, S, D), math.nan, device=DEV, dtype=dtype)
    v_cache = k_cache.clone()
    for b, n in enumerate(lengths):
        k_cache[b, :, :n] = randn(H, n, D, seed=b, dtype=dtype)
        v_cache[b, :, :n] = randn(H, n, D, seed=b + 100, dtype=dtype)
    q = randn(B, 3, H, D, seed=7, dtype=dtype)[:, 0]  # (B, H, D), strides (3HD, D, 1)
    want = decode_attention.reference(q, k_cache, v_cache, lens)
    got = decode_attention.attention_decode(q, k_cache, v_cache, lens, max(lengths))
    assert got.dtype == dtype
    assert_close(got, want, *ATTN_TOL[dtype], f"decode ({B}, {H}, {S}, {D}) lengths {lengths} {dtype}")
    assert torch.equal(decode_attention.attention_decode(q, k_cache, v_cache, lens, S), got)


def test_attention_decode_fp32_query_over_bf16_cache():
    """As the model runs bf16 and int8 files: fp32 queries and output over a bf16 KV cache (widened as read),
    against the torch backend on the same bf16 values."""
    from aigc_rt.backends.torch_backend import TorchBackend
    B, H, S, D = 3, 2, 37, 80
    k_cache, v_cache = (randn(B, H, S, D, seed=s, dtype=torch.bfloat16) for s in (4, 5))
    q, lens = randn(B, 3, H, D, seed=6)[:, 0], torch.tensor([37, 1, 20], device=DEV)
    got = decode_attention.attention_decode(q, k_cache, v_cache, lens, 37)
    assert got.dtype == torch.float32
    assert_close(got, TorchBackend(DEV).attention_decode(q, k_cache, v_cache, lens, 37), 2e-5, 2e-5, "bf16 cache")


def test_attention_decode_matches_torch_backend():
    """The torch backend's attention_decode (the backend reference) agrees with this file's reference."""
    from aigc_rt.backends.torch_backend import TorchBackend
    B, H, S, D = 3, 2, 21, 24
    k_cache, v_cache = randn(B, H, S, D, seed=1), randn(B, H, S, D, seed=2)
    q, lens = randn(B, H, D, seed=3), torch.tensor([21, 1, 9], device=DEV)
    got = decode_attention.attention_decode(q, k_cache, v_cache, lens, 21)
    assert_close(got, TorchBackend(DEV).attention_decode(q, k_cache, v_cache, lens, 21), 2e-5, 2e-5, "vs torch")


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_write_kv_matches_torch_backend(cache_dtype):
    """The decode step's keys and values land where the torch backend's write_kv puts them, bitwise (bf16
    rounded to nearest even, like .to()), from strided views of a qkv buffer; nothing else in the cache
    changes, and a position past the cache writes nothing."""
    from aigc_rt.backends.torch_backend import TorchBackend
    B, H, S, D = 3, 5, 19, 48
    qkv = randn(B, 3, H, D, seed=8) * 300  # large values: bf16 rounding of the low bits shows
    k, v = qkv[:, 1], qkv[:, 2]  # (B, H, D), strides (3HD, D, 1)
    positions = torch.tensor([0, 18, 7], device=DEV)
    start = randn(B, H, S, D, seed=9, dtype=cache_dtype)
    want_k, want_v = start.clone(), start.clone() + 1
    TorchBackend(DEV).write_kv(want_k, want_v, positions, k, v)
    got_k, got_v = start.clone(), start.clone() + 1
    decode_attention.write_kv(got_k, got_v, positions, k, v)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), \
        f"max diff k {(got_k - want_k).abs().max():.3g}, v {(got_v - want_v).abs().max():.3g}"
    untouched = start.clone()
    decode_attention.write_kv(untouched, untouched.clone(), torch.tensor([S, -1, S + 5], device=DEV), k, v)
    assert torch.equal(untouched, start)
    with pytest.raises(ValueError, match="k_cache has shape"):
        decode_attention.write_kv(got_k[:, :4], got_v[:, :4], positions, k, v)
    with pytest.raises(ValueError, match="positions must be a contiguous"):
        decode_attention.write_kv(got_k, got_v, positions[:2], k, v)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_decode_appending_new_kv_equals_write_then_attend(cache_dtype):
    """attention_decode(new_kv=, positions=) (write_kv fused into pass 1) gives bitwise the caches and output of
    write_kv followed by attention_decode: the new slot holds NaN before (it must be read from registers, not
    the cache), positions sit at chunk starts, ends and in between (S = 150 gives several chunks), and a row
    whose position is past its length only gets written."""
    B, H, S, D = 5, 3, 150, 40
    qkv = randn(B, 3, H, D, seed=30)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, H, D) strided views, as the model passes them
    cache_k, cache_v = randn(B, H, S, D, seed=31, dtype=cache_dtype), randn(B, H, S, D, seed=32, dtype=cache_dtype)
    positions = torch.tensor([0, 63, 64, 149, 20], device=DEV)
    lengths = positions + 1
    lengths[4] = 7  # position 20 lies past this row's length: written, not attended
    for b, p in enumerate(positions.tolist()):
        cache_k[b, :, p], cache_v[b, :, p] = math.nan, math.nan
    want_k, want_v = cache_k.clone(), cache_v.clone()
    decode_attention.write_kv(want_k, want_v, positions, k, v)
    want = decode_attention.attention_decode(q, want_k, want_v, lengths, S)
    got_k, got_v = cache_k.clone(), cache_v.clone()
    got = decode_attention.attention_decode(q, got_k, got_v, lengths, S, new_kv=(k, v), positions=positions)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), "the caches differ"
    assert torch.equal(got, want), f"max diff {(got - want).abs().max():.3g}"
    assert_close(got, decode_attention.reference(q, want_k, want_v, lengths), *ATTN_TOL[torch.float32], "vs reference")
    with pytest.raises(ValueError, match="new_kv and positions go together"):
        decode_attention.attention_decode(q, got_k, got_v, lengths, S, new_kv=(k, v))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the merge's -inf - -inf for the empty row
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_decode_in_one_pass(cache_dtype, monkeypatch):
    """A short cache is read in one pass (one program per row and head writes the output, no merge launch):
    the same inputs through one pass and through several chunks agree to fp32 rounding, with the step's k, v
    appended (bitwise the same caches), ragged lengths and a row of length 0 (zeros)."""
    B, H, S, D = 4, 3, 150, 40
    qkv = randn(B, 3, H, D, seed=40)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cache_k, cache_v = randn(B, H, S, D, seed=41, dtype=cache_dtype), randn(B, H, S, D, seed=42, dtype=cache_dtype)
    positions = torch.tensor([0, 149, 70, 5], device=DEV)
    lengths = positions + 1
    lengths[3] = 0
    settings = decode_attention.decode_settings(B * H, S, D, DEV)
    results = {}
    for n_splits in (3, 1):
        block = triton.cdiv(triton.cdiv(S, n_splits), settings["BLOCK_N"]) * settings["BLOCK_N"]
        monkeypatch.setattr(decode_attention, "decode_settings",
                            lambda *a: dict(settings, n_splits=n_splits, SPLIT_LEN=block))
        ck, cv = cache_k.clone(), cache_v.clone()
        out = torch.full((B, H, D), math.nan, device=DEV)
        decode_attention.attention_decode(q, ck, cv, lengths, S, new_kv=(k, v), positions=positions, out=out)
        results[n_splits] = (out, ck, cv)
    (split, *split_caches), (single, *single_caches) = results[3], results[1]
    assert all(torch.equal(a, b) for a, b in zip(split_caches, single_caches)), "the appended caches differ"
    assert torch.equal(single[3], torch.zeros_like(single[3])), "a row of length 0 must give zeros"
    assert_close(single, split, 1e-6, 1e-5, "one pass vs chunks")
    assert_close(single, decode_attention.reference(q, *single_caches, lengths), *ATTN_TOL[torch.float32],
                 "one pass vs reference")


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "nopos"])
def test_embedding_matches_torch_backend(dtype, with_pos):
    """Rows of a (V, C) table at ids of any shape (+ position rows), bitwise the torch backend's; C = 100 (not a
    power of two); an id or a position out of range gives a NaN row, never a read outside the table."""
    from aigc_rt.backends.torch_backend import TorchBackend
    from aigc_rt.kernels import embedding
    V, P, C = 37, 11, 100
    table = randn(V, C, seed=10)
    scale = None
    if dtype == "int8":
        table = torch.randint(-127, 128, (V, C), generator=torch.Generator().manual_seed(3), dtype=torch.int8).to(DEV)
        scale = torch.rand(V, generator=torch.Generator().manual_seed(4)).to(DEV) / 127
    elif dtype == "bf16":
        table = table.to(torch.bfloat16)
    ids = torch.tensor([[0, 36, 5], [5, 17, 2]], device=DEV)
    pos = dict(pos_table=randn(P, C, seed=11), positions=torch.tensor([[0, 10, 3], [1, 1, 9]], device=DEV)) \
        if with_pos else {}
    want = TorchBackend(DEV).embedding(table, ids, scale=scale, **pos)
    got = embedding.embedding(table, ids, scale=scale, **pos)
    assert got.shape == (2, 3, C) and torch.equal(got, want), f"max diff {(got - want).abs().max():.3g}"
    bad = embedding.embedding(table, torch.tensor([3, V, -1], device=DEV), scale=scale,
                              **({} if not with_pos else dict(pos_table=pos["pos_table"],
                                                               positions=torch.tensor([P, 0, 0], device=DEV))))
    assert bad.isnan().all(dim=1).tolist() == [with_pos, True, True]
    with pytest.raises(ValueError, match="scale is required for int8 tables and only for them"):
        embedding.embedding(table, ids, scale=None if scale is not None else torch.ones(V, device=DEV))


# -- sampling ---------------------------------------------------------------------------------------------
# The kernel draws exactly the reference's token unless u lies within float rounding of a CDF boundary
# (both compute the same sums in different orders). CDF_EPS bounds that rounding: fp32 sums over at most
# 50,257 terms carry relative errors ~1e-6, so 2e-5 of the total mass is a safe margin.
CDF_EPS = 2e-5
SAMPLE_PARAMS = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(do_sample=True, temperature=0.7),
    SamplingParams(do_sample=True, top_k=5),
    SamplingParams(do_sample=True, temperature=1.3, top_p=0.8),
    SamplingParams(do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.2),
    SamplingParams(do_sample=True, top_k=1),
    SamplingParams(do_sample=True, top_p=0.02),
    SamplingParams(do_sample=True, top_k=100_000),  # >= V: off
]
SAMPLE_IDS = ["greedy", "greedy-penalty", "temperature", "top_k", "top_p", "all", "top_k=1", "tiny-top_p",
              "huge-top_k"]


def check_draws(got: torch.Tensor, logits: torch.Tensor, params: SamplingParams, u: torch.Tensor,
                seen: torch.Tensor | None) -> int:
    """Assert the kernel's tokens equal sample_reference's, except where u is within CDF_EPS of the CDF
    boundary between the two tokens (and the kernel's token is one the reference keeps). Returns how many
    rows took that exception."""
    want = sampling.reference(logits, params, u, seen)
    exceptions = 0
    for row in (got != want).nonzero().flatten().tolist():
        g, w = int(got[row]), int(want[row])
        assert params.do_sample and g >= 0 and w >= 0, f"row {row}: kernel {g} != reference {w}"
        x = logits[row:row + 1].float().cpu()
        if seen is not None and params.repetition_penalty != 1.0:
            x = apply_repetition_penalty(x, seen[row:row + 1].cpu(), params.repetition_penalty)
        probs = filter_logits(x, params.temperature, params.top_k, params.top_p)[0].double().softmax(-1)
        cdf = probs.cumsum(0)
        lo, hi = min(g, w), max(g, w)
        uu = float(u[row])
        assert probs[g] > 0, f"row {row}: the kernel drew token {g}, which the filters remove"
        assert abs(uu - cdf[lo]) <= CDF_EPS and cdf[hi - 1] - cdf[lo] <= CDF_EPS, (
            f"row {row}: kernel {g} != reference {w} with u={uu:.7f}, CDF at the boundary {float(cdf[lo]):.7f}")
        exceptions += 1
    return exceptions


@pytest.fixture(scope="module")
def sample_inputs():
    """(logits, seen, u): random rows with ties at the top, a row of all-equal logits, rows with NaN / +inf /
    -inf, -0.0 next to 0.0, and u spanning [0, 1) including both ends."""
    B, V = (32, 1003) if not ON_GPU else (64, 50257)
    logits = randn(B, V, seed=0, scale=3)
    logits[1, :10] = logits[1].max() + 0.5  # ten-way tie for the maximum
    logits[2, 0] = math.nan
    logits[3, 5] = math.inf
    logits[4, V - 1] = -math.inf
    logits[5] = 0.25  # all equal
    logits[6, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0])
    logits[6, 4:] = -1.0
    logits[7, :50] = logits[7].max() + 1  # top-k=5 boundary inside a 50-way tie
    seen = (randn(B, V, seed=1) > 1.0)
    u = torch.tensor([uniform(3, 0, s) for s in range(B)], device=DEV)
    u[0], u[8] = 0.0, 1 - 2 ** -24
    return logits, seen, u


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's NumPy on the NaN/inf rows
@pytest.mark.parametrize("params", SAMPLE_PARAMS, ids=SAMPLE_IDS)
def test_sample_matches_reference(sample_inputs, params):
    logits, seen, u = sample_inputs
    got = sampling.sample(logits, params, u, seen if params.repetition_penalty != 1.0 else None)
    assert got.dtype == torch.int64 and got.device == logits.device
    assert got[2:5].tolist() == [-1, -1, -1], "rows with NaN/inf logits must give -1"
    exceptions = check_draws(got, logits, params, u, seen if params.repetition_penalty != 1.0 else None)
    assert exceptions <= 1, f"{exceptions} rows differ from the reference at CDF boundaries"


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("width", [None, 200], ids=["split", "one-chunk"])  # 200: one program streams each row
@pytest.mark.parametrize("params", [SAMPLE_PARAMS[i] for i in (0, 1, 5, 7)], ids=["greedy", "penalty", "all",
                                                                                  "top_p"])
def test_sample_advances_positions_and_marks_seen(sample_inputs, params, width):
    """A generation step's bookkeeping in the sampler's last kernel (the triton backend's sample_step):
    the same tokens as without it, every position + 1, and each token marked seen but a NaN row's -1."""
    logits, seen, u = sample_inputs
    if width is not None:
        logits, seen = logits[:, :width].contiguous(), seen[:, :width].contiguous()
    penalty = seen if params.repetition_penalty != 1.0 else None
    want = sampling.sample(logits, params, u, penalty)
    positions = torch.arange(len(u), device=DEV) * 7
    marked = seen.clone()  # the penalty's seen set too, when there is one: read, then marked
    got = sampling.sample(logits, params, u, marked, advance=positions, mark_seen=True)
    assert got.tolist() == want.tolist()
    assert positions.tolist() == [7 * b + 1 for b in range(len(u))]
    expect = seen.clone()
    ok = want >= 0
    expect[ok.nonzero()[:, 0], want[ok]] = True
    assert torch.equal(marked, expect), "seen set: " + str((marked != expect).nonzero().tolist()[:5])
    with pytest.raises(ValueError, match="mark_seen needs the seen set"):
        sampling.sample(logits, params, u, None, mark_seen=True)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("params", [SAMPLE_PARAMS[i] for i in (0, 1, 2, 8)],
                         ids=["greedy", "greedy-penalty", "temperature", "huge-top_k"])
def test_sample_in_one_launch_equals_two(sample_inputs, monkeypatch, params):
    """Without candidates (no top-k / top-p) the split path's merge is run by each row's last chunk program
    (ONE_LAUNCH, the default; the merge kernel is not launched) instead of a launch of its own: the same tokens,
    positions and seen sets, and the counters (the caller's here) back at zero."""
    logits, seen, u = sample_inputs
    penalty = params.repetition_penalty != 1.0
    merge_kernel = sampling._sample_merge_kernel
    results = []
    for one in (False, True):
        monkeypatch.setattr(sampling, "ONE_LAUNCH", one)
        monkeypatch.setattr(sampling, "_sample_merge_kernel", None if one else merge_kernel)
        marked, positions = seen.clone(), torch.arange(len(u), device=DEV)
        counters = utils.new_counters(DEV)
        got = sampling.sample(logits, params, u, marked if penalty else None, advance=positions, counters=counters)
        assert not counters.any(), f"counters left {counters.nonzero().flatten().tolist()}"
        results.append((got.tolist(), positions.tolist(), marked))
    (want, want_pos, want_seen), (got, got_pos, got_seen) = results
    assert got == want and got_pos == want_pos and torch.equal(got_seen, want_seen)
    assert check_draws(torch.tensor(got, device=DEV), logits, params, u, seen if penalty else None) <= 1


@pytest.mark.skipif(ON_GPU, reason="a GPU runs these settings in test_sample_matches_reference")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("params", [SAMPLE_PARAMS[i] for i in (0, 2, 5, 6)], ids=["greedy", "temperature", "all",
                                                                                  "top_k=1"])
def test_sample_with_the_gpu_settings(gpu_settings, params):
    """The sampler as a GPU runs it (chunks of 2,048 logits, 8 pivots per search over values in registers, 16
    per streaming pass), here under the interpreter, over GPT-2's vocabulary: rows with ties at the top, all
    equal, a 50-way tie across the top-k boundary, and a NaN."""
    V = 50257
    logits = randn(4, V, seed=0, scale=3)
    logits[1, 3000:3010] = logits[1].max() + 0.5  # ten-way tie for the maximum, in the second chunk
    logits[2] = 0.25
    logits[3, 4000:4050] = logits[3].max() + 1  # top_k 50 ends inside a tie with the rest of row 3's top
    logits[3, 100] = logits[3, 4000]  # one more: 51 tied
    bad = logits.clone()
    bad[0, 7] = math.nan
    seen = randn(4, V, seed=1) > 1.0
    u = torch.tensor([uniform(3, 0, s) for s in range(4)], device=DEV)
    penalty = seen if params.repetition_penalty != 1.0 else None
    assert check_draws(sampling.sample(logits, params, u, penalty), logits, params, u, penalty) <= 1
    assert sampling.sample(bad[:1], params, u[:1], None if penalty is None else penalty[:1]).tolist() == [-1]


@pytest.mark.skipif(ON_GPU, reason="stubs a device function, which only the interpreter allows")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("vocab", [1003, 50257])
def test_sample_top_p_alone_over_candidates(request, monkeypatch, vocab):
    """Top-p without top-k on the split path: the merge first tries each chunk's TOP_P_CANDIDATES largest values.
    In peaked rows they hold top_p of the mass, so it draws among them and never streams the row (the streaming
    draw is stubbed to fail); in flat rows they do not, and it streams. Both as the reference. V = 50,257: with
    a GPU's settings (chunks of 2,048)."""
    if vocab > 1003:
        request.getfixturevalue("gpu_settings")
    params = SamplingParams(do_sample=True, temperature=0.9, top_p=0.9)
    B = 4
    peaked = randn(B, vocab, seed=11)
    peaked[:, 600:640] += 9.0  # 40 tokens hold nearly all the mass, across a chunk boundary at V = 1003
    peaked[1, 900] = peaked[1, 600]  # a tie among them, in another chunk
    flat = randn(B, vocab, seed=12, scale=0.1)  # the mass spread over the whole row
    u = torch.tensor([uniform(7, 0, s) for s in range(B)], device=DEV)
    stream = sampling._filter_and_draw

    def must_not_stream(*args):
        raise AssertionError("streamed the row")
    monkeypatch.setattr(sampling, "_filter_and_draw", must_not_stream)
    got = sampling.sample(peaked, params, u, None)
    assert check_draws(got, peaked, params, u, None) <= 1
    with pytest.raises(Exception, match="streamed the row"):  # (the interpreter wraps it in an InterpreterError)
        sampling.sample(flat, params, u, None)
    monkeypatch.setattr(sampling, "_filter_and_draw", stream)
    assert check_draws(sampling.sample(flat, params, u, None), flat, params, u, None) <= 1


def test_sample_multi_block_rows_and_out():
    """Rows several kernel blocks long (V = 2500 > the interpreter's block of 1024) with top-k/top-p
    thresholds in a later block and greedy ties across blocks (the first column wins, whichever lane of the
    block holds it: greedy keeps a running best per lane); out= is written in place."""
    V = 2500
    logits = randn(6, V, seed=9, scale=2)
    logits[:, 2000:2010] += 6  # the kept tokens live in the third block
    logits[0, [100, 2100]] = 50.0  # lanes 100 and 52 of 1024
    logits[1, [52, 1076, 2100]] = 50.0  # one lane (52), three blocks
    logits[3, [1000, 1030]] = 50.0  # the first column sits in the later lane
    u = torch.tensor([uniform(5, j, 0) for j in range(6)], device=DEV)
    out = torch.empty(6, dtype=torch.int64, device=DEV)
    for params in (SamplingParams(do_sample=True, top_k=7, top_p=0.9), SamplingParams()):
        assert sampling.sample(logits, params, u, None, out=out) is out
        assert check_draws(out, logits, params, u, None) == 0


# -- bad input --------------------------------------------------------------------------------------------
def _bad_calls():
    f32 = dict(device=DEV)
    x, w, b = torch.randn(2, 8, **f32), torch.randn(4, 8, **f32), torch.randn(4, **f32)
    q = torch.randn(1, 2, 5, 16, **f32)
    qd, kc, lens = torch.randn(2, 3, 16, **f32), torch.randn(2, 3, 9, 16, **f32), torch.tensor([3, 9], device=DEV)
    logits, u = torch.randn(2, 11, **f32), torch.rand(2, **f32)
    return [
        ("layernorm weight size", lambda: layernorm.layernorm(x, torch.ones(7, **f32), torch.zeros(8, **f32), 1e-5),
         "weight must be a contiguous \\(8,\\)"),
        ("layernorm fp64", lambda: layernorm.layernorm(x.double(), torch.ones(8, **f32), torch.zeros(8, **f32), 1e-5),
         "x must be one of"),
        ("linear in-features", lambda: linear.linear(torch.randn(2, 7, **f32), w, b), "in-features 8"),
        ("linear bias", lambda: linear.linear(x, w, torch.randn(5, **f32)), "bias must be"),
        ("linear act", lambda: linear.linear(x, w, b, "gelu"), "act must be one of"),
        ("linear int8 without scale", lambda: linear.linear(x, w.to(torch.int8), b), "scale is required for int8"),
        ("linear int64", lambda: linear.linear(x, w.long(), b), "weight must be one of"),
        ("linear non-contiguous x", lambda: linear.linear(torch.randn(8, 2, **f32).t(), w, b),
         "contiguous in its last"),
        ("linear out shape", lambda: linear.linear(x, w, b, out=torch.empty(2, 5, **f32)), "out must be"),
        ("prefill shapes", lambda: attention.attention_prefill(q, q[:, :1], q), "k has shape"),
        ("prefill dtypes", lambda: attention.attention_prefill(q, q.half(), q), "k must be one of"),
        ("prefill head_dim", lambda: attention.attention_prefill(*(torch.randn(1, 1, 2, 300, **f32),) * 3),
         "head_dim"),
        ("decode cache shape", lambda: decode_attention.attention_decode(qd, kc[:, :2], kc[:, :2], lens, 9),
         "k_cache has shape"),
        ("decode lengths dtype", lambda: decode_attention.attention_decode(qd, kc, kc, lens.float(), 9),
         "lengths must be one of"),
        ("decode lengths shape", lambda: decode_attention.attention_decode(qd, kc, kc, lens[:1], 9),
         "lengths must be a contiguous \\(2,\\)"),
        ("decode max_len", lambda: decode_attention.attention_decode(qd, kc, kc, lens, 10), "max_len=10"),
        ("sample logits dims", lambda: sampling.sample(logits[0], SamplingParams(), u, None),
         "logits must have 2 dimensions"),
        ("sample u shape", lambda: sampling.sample(logits, SamplingParams(), u[:1], None), "u must be"),
        ("sample seen shape", lambda: sampling.sample(logits, SamplingParams(repetition_penalty=1.2), u,
                                                      torch.zeros(2, 10, dtype=torch.bool, device=DEV)), "seen has"),
        ("sample params", lambda: sampling.sample(logits, {"do_sample": True}, u, None), "SamplingParams"),
    ]


@pytest.mark.parametrize("name,call,message", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_raise_value_error(name, call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_kernels_compile_for_gpu():
    """Every kernel variant compiles to a cubin for sm_90 (ptxas ships with triton), GPU or not: catches what
    the interpreter accepts but the compiler rejects, and what compiles but would not run well or at all."""
    pytest.importorskip("triton.backends.nvidia")
    env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compile_triton_kernels.py")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("-> sm_90") >= 16, r.stdout
    # Compiled with the specialization a GPT-2 launch gets, the kernels that stream weights, activations or the
    # KV cache read them 16 bytes at a time (ld.global.v4 or a 16-byte cp.async), never in 1-2 byte pieces:
    # without the alignment hints, the bf16 GEMV's weight loads had been 2-byte ones
    streaming = ("_gemv_kernel", "_gemv_int4_kernel", "_linear_kernel", "_attention_kernel", "_decode_split_kernel",
                 "_layernorm_kernel", "_embedding_kernel", "_mlp_kernel")
    lines = [line for line in r.stdout.splitlines() if line.split(" ", 1)[0] in streaming]
    assert len(lines) >= 20, r.stdout
    for line in lines:
        widths = [int(w) for w in re.findall(r"(\d+) B x", line.split(" loads ", 1)[1])]
        assert 16 in widths and min(widths) >= 4, line
    # the GEMM multiplies 16-bit and int8 weights on the tensor cores (int8: three bf16 dots, utils.split_bf16x3; an
    # fp32 tl.dot would run on the FMA pipes, and ptxas says nothing of it)
    gemms = [line for line in r.stdout.splitlines() if re.match(r"_linear_kernel +(bf16|fp16|int8) ", line)]
    assert len(gemms) >= 4 and all(re.search(r"(wgmma|mma\.sync) x \d+", line) for line in gemms), gemms
    # and every variant's shared memory fits a Hopper block (227 KiB): past it a launch fails on the GPU only
    shared = [int(n) for n in re.findall(r"(\d+) B shared", r.stdout)]
    assert shared and max(shared) <= 227 * 1024, r.stdout


def test_interpreter_version_guard():
    """triton < 3.7's interpreter cannot run with numpy >= 2.4; the import names the pair instead of every
    kernel failing inside the interpreter."""
    from aigc_rt.kernels.utils import interpreter_problem
    assert "install triton>=3.7 or numpy<2.4" in interpreter_problem("3.6.0", "2.4.6")
    assert interpreter_problem("3.6.0", "2.2.6") is None
    assert interpreter_problem("3.7.0", "2.4.0") is None
    assert interpreter_problem("3.10.1", "2.5.0") is None


@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_linear_relu_keeps_nan(kernel):
    """ReLU's epilogue passes NaN on, as torch.relu does (a max would turn it into 0 and hide bad weights)."""
    x, w = randn(2, 9, seed=1), randn(5, 9, seed=2)
    x[1, 3] = float("nan")
    y = linear.linear(x, w, None, "relu", kernel=kernel)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()
    assert_close(y[0], linear.reference(x[:1], w, None, "relu")[0], *LINEAR_TOL, f"relu {kernel}")


@triton.jit
def _row_max_sum_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """y[p] = max(x[p]) + sum(x[p]) over row p of BLOCK values: two calls of triton's @jit library per program."""
    p = tl.program_id(0)
    x = tl.load(x_ptr + p * BLOCK + tl.arange(0, BLOCK))
    tl.store(y_ptr + p, tl.max(x, axis=0) + tl.sum(x, axis=0))


@pytest.mark.skipif(not INTERPRETER, reason="the interpreter's language patching (GPU: nothing to patch)")
def test_interpreter_patches_the_language_once_a_launch(monkeypatch):
    """utils.patch_language_once: a launch patches triton.language a fixed number of times however many programs
    call tl.max / tl.sum (triton alone patches it again on every such call, ~2 ms each), and the results are
    right; the interpreter's int32 overflow checks are off unless TRITON_DEBUG=1, as in a compiled kernel."""
    from triton.runtime import interpreter
    if not getattr(interpreter._patch_lang, "once", False):
        pytest.skip("this triton's interpreter has no _patch_lang to wrap (utils.patch_language_once left it as is)")
    patches = []
    builtin = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a: patches.append(1) or builtin(*a))
    counts = {}
    for programs in (1, 1, 16):  # the first launch may patch differently (triton's own first-call set-up)
        x = torch.randn(programs, 32, generator=torch.Generator().manual_seed(programs))
        y = torch.empty(programs)
        patches.clear()
        _row_max_sum_kernel[(programs,)](x, y, BLOCK=32)
        counts[programs] = len(patches)
        torch.testing.assert_close(y, x.max(1).values + x.sum(1), rtol=1e-5, atol=1e-5)
    assert counts[16] == counts[1] > 0, counts
    assert interpreter.interpreter_builder.options.sanitize_overflow == (os.environ.get("TRITON_DEBUG", "0")
                                                                        not in ("", "0"))


def test_autotune_candidates_compiled_in_parallel(monkeypatch):
    """launch_tuned, as on a GPU: the first launch of a shape has each candidate the autotuner will time for it
    compiled first, inside triton's AsyncCompileMode (so on the thread pool), once per shape; a failure there is
    warned about once and the launch still happens. Here triton's warmup is a stub that records what it gets."""
    from triton.runtime import _async_compile
    monkeypatch.setattr(utils, "INTERPRETER", False)
    monkeypatch.setattr(utils, "_precompiled", set())
    monkeypatch.setattr(utils, "_precompile_failed", [])
    tuned = linear._gemv_tuned
    monkeypatch.setattr(tuned, "cache", {})
    warmed = []

    def warmup(*args, grid, **kwargs):
        assert _async_compile.active_mode.get() is not None, "compiled outside AsyncCompileMode"
        warmed.append(kwargs)
    monkeypatch.setattr(tuned.fn, "warmup", warmup)
    launched = []

    def launch(self, grid):  # the autotuner: launches, and has timed the candidates of the shape it tuned
        return lambda *a, **k: (launched.append(k), setattr(self, "configs_timings", {want[0]: [0.02, 0.02, 0.02]}))
    monkeypatch.setattr(type(tuned), "__getitem__", launch)
    monkeypatch.setattr(tuned, "configs_timings", None, raising=False)
    monkeypatch.setattr(utils, "tuning_log", {})
    M, N, K = 1, 37, 1100
    x, w, y = randn(M, K, seed=1), randn(N, K, seed=2, dtype=torch.bfloat16), torch.empty(M, N, device=DEV)
    args = (x, w, w, w, y, x, x, N, K, K, K, N, 1.0)
    flags = dict(SCALED=False, HAS_BIAS=False, GELU=False, RELU=False, NORM=False, ACCUMULATE=False, PDL=False,
                 NORM_BLOCK=16)
    grid = linear.gemv_grid(N, M, DEV)
    want = linear._candidates(tuned.configs, dict(w_ptr=w, K=K))
    utils.launch_tuned(tuned, grid, *args, **flags)
    assert [(k["BLOCK_N"], k["BLOCK_K"], k["STAGES"] if "STAGES" in k else 1, k["PERSISTENT"], k["num_warps"])
            for k in warmed] == [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs.get("STAGES", 1),
                                  c.kwargs["PERSISTENT"], c.num_warps) for c in want]
    assert all(k["NORM"] is False and k["NORM_BLOCK"] == 16 for k in warmed) and len(launched) == 1
    assert list(utils.tuning_log) == [("_gemv_kernel", utils._tuning_key(tuned, args, flags))]  # its times kept
    utils.launch_tuned(tuned, grid, *args, **flags)
    assert len(warmed) == len(want) and len(launched) == 2, "a shape's candidates compiled twice"

    def broken(*args, **kwargs):
        raise TypeError("warmup moved")
    monkeypatch.setattr(tuned.fn, "warmup", broken)
    with pytest.warns(RuntimeWarning, match="compiling autotune candidates in parallel failed"):
        utils.launch_tuned(tuned, grid, *args[:7], N + 1, *args[8:], **flags)
    assert len(launched) == 3
