"""Triton kernels vs torch on a GPU (pytest-benchmark groups; skipped without one), and the GPT-2 decode
comparison of issue 6 (bench/gpu_decode.py).

    pytest bench/bench_triton.py --benchmark-enable [--benchmark-group-by=group]

Each timed call launches the op REPS times, then synchronises once, so launch latency is amortised the same
way for both sides; compare the rows of a group (same shapes, same REPS). GPT-2 124M / 1.5B shapes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aigc_rt.kernels import attention, decode_attention, embedding, layernorm, linear, mlp, sampling, utils
from aigc_rt.kernels.utils import INTERPRETER
from aigc_rt.sampling import SamplingParams, sample_reference

ON_GPU = not INTERPRETER and torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")]
REPS = 20
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn):
    def run():
        for _ in range(REPS):
            fn()
        torch.cuda.synchronize()
    run()  # compile / warm up outside the timing
    return run


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device="cuda", dtype=dtype)


@pytest.mark.benchmark(group="layernorm_linear")
@pytest.mark.parametrize("M,N,K", [(1, 2304, 768), (1, 3072, 768), (1, 50257, 768), (8, 3072, 768), (1, 6400, 1600)])
@pytest.mark.parametrize("impl", ["triton-prologue", "triton-apart", "torch"])
def test_layernorm_linear(benchmark, impl, M, N, K):
    """A pre-norm sub-layer's input projection, bf16 weights: the LayerNorm in the linear's prologue (what the
    triton backend runs for decode rows), as its own launch before the linear, and torch (layer_norm + F.linear)."""
    x, w, bias, g, beta = randn(M, K), randn(N, K, dtype=torch.bfloat16) * K ** -0.5, randn(N), randn(K), randn(K)
    h = torch.empty_like(x)
    if impl == "triton-prologue":
        fn = lambda: linear.linear(x, w, bias, norm=(g, beta, 1e-5))  # noqa: E731
    elif impl == "triton-apart":
        fn = lambda: linear.linear(layernorm.layernorm(x, g, beta, 1e-5, out=h), w, bias)  # noqa: E731
    else:
        fn = lambda: F.linear(F.layer_norm(x, (K,), g, beta, 1e-5).to(w.dtype), w).float() + bias  # noqa: E731
    benchmark(timed(fn))


@pytest.mark.benchmark(group="linear_residual")
@pytest.mark.parametrize("M,N,K", [(1, 768, 768), (1, 768, 3072), (8, 1600, 6400)])
@pytest.mark.parametrize("impl", ["triton-epilogue", "triton-apart", "torch"])
def test_linear_residual(benchmark, impl, M, N, K):
    """A sub-layer's output projection added into the residual stream, bf16 weights: the add in the linear's
    epilogue, as a separate torch add, and torch (F.linear + add_)."""
    x, w, bias, r = randn(M, K), randn(N, K, dtype=torch.bfloat16) * K ** -0.5, randn(N), randn(M, N)
    if impl == "triton-epilogue":
        fn = lambda: linear.linear(x, w, bias, residual=r)  # noqa: E731
    elif impl == "triton-apart":
        fn = lambda: r.add_(linear.linear(x, w, bias))  # noqa: E731
    else:
        fn = lambda: r.add_(F.linear(x.to(w.dtype), w).float() + bias)  # noqa: E731
    benchmark(timed(fn))


@pytest.mark.benchmark(group="mlp")
@pytest.mark.parametrize("M,C", [(1, 768), (8, 768), (1, 1600), (8, 1600)])
@pytest.mark.parametrize("impl", ["triton-fused", "triton-two-linears", "torch"])
def test_mlp(benchmark, impl, M, C):
    """GPT-2's MLP sub-layer r += proj(GELU(fc(LN(r)))), H = 4C, bf16 weights: kernels/mlp.py's one launch, the
    two fused linears the triton backend runs otherwise (LayerNorm prologue, residual epilogue), and torch."""
    H = 4 * C
    r = randn(M, C)
    w1, w2 = randn(H, C, dtype=torch.bfloat16) * C ** -0.5, randn(C, H, dtype=torch.bfloat16) * H ** -0.5
    b1, b2, g, beta = randn(H), randn(C), randn(C), randn(C)
    norm, counters, h = (g, beta, 1e-5), utils.new_counters("cuda"), torch.empty(M, H, device="cuda")

    def fn():
        if impl == "triton-fused":
            return mlp.mlp(r, w1, b1, w2, b2, norm=norm, counters=counters)
        if impl == "triton-two-linears":
            return linear.linear(linear.linear(r, w1, b1, "gelu_tanh", norm=norm, out=h), w2, b2, residual=r)
        f = F.gelu(F.linear(F.layer_norm(r, (C,), g, beta, 1e-5).to(w1.dtype), w1).float() + b1, approximate="tanh")
        return r.add_(F.linear(f.to(w2.dtype), w2).float() + b2)
    benchmark(timed(fn))


@pytest.mark.benchmark(group="linear")
@pytest.mark.parametrize("M,N,K", [(1, 2304, 768), (1, 3072, 768), (1, 768, 3072), (1, 50257, 768),
                                   (1, 6400, 1600), (8, 3072, 768), (8, 50257, 1600), (512, 3072, 768)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["triton", "triton-gemv", "triton-gemm", "torch"])
def test_linear(benchmark, impl, dtype, M, N, K):
    """triton: the launcher's choice; -gemv / -gemm: forced (the batch-1 policy GEMV_MAX_M comes from
    these rows); torch: F.linear (cuBLAS) on the same dtype, then bias + GELU."""
    x, w, bias = randn(M, K), randn(N, K, dtype=DT[dtype]) * K ** -0.5, randn(N)
    if impl == "torch":
        fn = lambda: F.gelu(F.linear(x.to(w.dtype), w).float() + bias, approximate="tanh")  # noqa: E731
    else:
        kernel = {"triton": None, "triton-gemv": "gemv", "triton-gemm": "gemm"}[impl]
        fn = lambda: linear.linear(x, w, bias, "gelu_tanh", kernel=kernel)  # noqa: E731
    benchmark.extra_info["weight_GB"] = w.numel() * w.element_size() / 1e9
    benchmark(timed(fn))


@pytest.mark.benchmark(group="attention_prefill")
@pytest.mark.parametrize("B,H,T,D", [(1, 12, 1024, 64), (8, 25, 256, 64)])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_attention_prefill(benchmark, impl, dtype, B, H, T, D):
    q, k, v = (randn(B, H, T, D, dtype=DT[dtype]) for _ in range(3))
    if impl == "triton":
        fn = lambda: attention.attention_prefill(q, k, v)  # noqa: E731
    else:
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    benchmark(timed(fn))


@pytest.mark.benchmark(group="attention_decode")
@pytest.mark.parametrize("B,H,S,D", [(1, 12, 1024, 64), (8, 12, 1024, 64), (1, 25, 1024, 64), (8, 25, 1024, 64)])
@pytest.mark.parametrize("impl", ["triton", "triton-append", "torch"])
def test_attention_decode(benchmark, impl, B, H, S, D):
    """Lengths ~ the middle of a generation; triton-append also writes the step's k, v (write_kv fused);
    torch: the torch backend's reference (masked einsum)."""
    from aigc_rt.backends.torch_backend import TorchBackend
    q, k_cache, v_cache = randn(B, H, D), randn(B, H, S, D), randn(B, H, S, D)
    lengths = torch.randint(S // 4, S // 2, (B,), device="cuda")
    max_len = S // 2
    if impl == "triton":
        fn = lambda: decode_attention.attention_decode(q, k_cache, v_cache, lengths, max_len)  # noqa: E731
    elif impl == "triton-append":
        new_kv, positions = (randn(B, H, D), randn(B, H, D)), lengths - 1
        fn = lambda: decode_attention.attention_decode(q, k_cache, v_cache, lengths, max_len, new_kv=new_kv,  # noqa: E731
                                                       positions=positions)
    else:
        be = TorchBackend(torch.device("cuda"))
        fn = lambda: be.attention_decode(q, k_cache, v_cache, lengths, max_len)  # noqa: E731
    benchmark(timed(fn))


@pytest.mark.benchmark(group="attention_sublayer")
@pytest.mark.parametrize("B,H,S,C", [(1, 12, 192, 768), (8, 12, 192, 768), (1, 25, 192, 1600), (1, 25, 1024, 1600)])
@pytest.mark.parametrize("impl", ["triton-block", "triton-qkv+attn-proj", "triton-apart"])
def test_attention_sublayer(benchmark, impl, B, H, S, C):
    """A decode step's attention sub-layer, r += proj(attention(qkv(LN1(r)))) with this step's k, v appended, bf16
    cache and weights: one launch (attention_block: caches read in one pass only, so not at S = 1,024), the qkv
    linear then the attention with its projection fused, and the qkv linear, the attention and the projection
    apart (LayerNorm prologue and residual epilogue in the linears)."""
    if impl == "triton-block" and S > 256:
        pytest.skip("attention_block takes caches read in one pass")
    D = C // H
    r, kc, vc = randn(B, C), randn(B, H, S, D, dtype=torch.bfloat16), randn(B, H, S, D, dtype=torch.bfloat16)
    lengths = torch.full((B,), S - 1, device="cuda")
    positions = lengths - 1
    wq, bq = randn(3 * C, C, dtype=torch.bfloat16) * C ** -0.5, randn(3 * C)
    wo, bo = randn(C, C, dtype=torch.bfloat16) * C ** -0.5, randn(C)
    norm, counters = (randn(C), randn(C), 1e-5), utils.new_counters("cuda")
    qkv, o = torch.empty(B, 3 * C, device="cuda"), torch.empty(B, H, D, device="cuda")

    def fn():
        if impl == "triton-block":
            return decode_attention.attention_block(r, norm, (wq, bq, None), (wo, bo, None), kc, vc, positions,
                                                    lengths, counters=counters)
        q, k, v = linear.linear(r, wq, bq, norm=norm, out=qkv).view(B, 3, H, D).unbind(1)
        if impl == "triton-qkv+attn-proj":
            return decode_attention.attention_decode(q, kc, vc, lengths, S, new_kv=(k, v), positions=positions,
                                                     proj=(wo, bo, None), residual=r, counters=counters)
        a = decode_attention.attention_decode(q, kc, vc, lengths, S, new_kv=(k, v), positions=positions, out=o)
        return linear.linear(a.view(B, C), wo, bo, residual=r)
    benchmark(timed(fn))


@pytest.mark.benchmark(group="embedding")
@pytest.mark.parametrize("B,C", [(1, 768), (8, 1600)])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_embedding(benchmark, impl, B, C):
    """A decode step's token + position rows (V = 50,257, 1,024 positions); torch: the torch backend's."""
    from aigc_rt.backends.torch_backend import TorchBackend
    table, pos_table = randn(50257, C, dtype=torch.bfloat16), randn(1024, C)
    ids, positions = torch.randint(0, 50257, (B,), device="cuda"), torch.randint(0, 1024, (B,), device="cuda")
    impl_fn = embedding.embedding if impl == "triton" else TorchBackend(torch.device("cuda")).embedding
    benchmark(timed(lambda: impl_fn(table, ids, pos_table=pos_table, positions=positions)))


@pytest.mark.benchmark(group="sample")
@pytest.mark.parametrize("name,params", [
    ("greedy", SamplingParams()),
    ("top_k=50,t=0.7", SamplingParams(do_sample=True, top_k=50, temperature=0.7)),
    ("top_p=0.9", SamplingParams(do_sample=True, top_p=0.9)),
    ("top_k=50,top_p=0.9,penalty", SamplingParams(do_sample=True, top_k=50, top_p=0.9, repetition_penalty=1.2)),
])
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_sample(benchmark, impl, B, name, params):
    """V = 50,257; torch: sample_reference (the full sort top-p), on the GPU."""
    logits, u = randn(B, 50257) * 3, torch.rand(B, device="cuda")
    seen = torch.rand(B, 50257, device="cuda") < 0.01
    fn = sampling.sample if impl == "triton" else sample_reference
    benchmark(timed(lambda: fn(logits, params, u, seen)))


@pytest.mark.benchmark(group="gpt2_decode")
def test_gpt2_decode_table(benchmark):
    """The issue's table: every size, batch 1 and 8, fp32 and bf16, HF eager / HF compile / ours; writes
    bench/results/gpu_decode-<device>-<date>.{md,json} (run once; pytest-benchmark only records the wall time)."""
    import gpu_decode
    benchmark.pedantic(gpu_decode.main, args=([],), rounds=1, iterations=1)
