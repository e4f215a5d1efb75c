"""Microbenchmarks: the C++ CPU linear, attention and sampling kernels (backend "cpu") vs PyTorch, measured in
the same run; a ratio table prints at the end.

    flock -x /tmp/aigc_rt-quiet.lock .venv/bin/python -m pytest bench/bench_cpu_ops.py --benchmark-enable

Linear: the 48 block matrices of GPT-2 124M, called in turn as a decode step does (so the weights stream from
DRAM: 340 MB fp32, 170 MB fp16 / bf16, 85 MB int8, 48 MB int4), at 1 and 8 rows, with the cpu kernels forced to each
ISA this CPU has (avx512f: AVX-512 without the bf16 / VNNI extensions, forced on CPUs that have them too); "torch" is
the best PyTorch of that dtype here (prepacked oneDNN fp32 / bf16 linears, dynamic int8, its int4 weight-only
linear in bf16; fp16: a plain F.linear, PyTorch has no faster fp16 path on a CPU), and GB/s counts the weight bytes.
torch uses the best ISA it has either way, so on an AVX-512 CPU the avx2 lines show what an AVX2-only CPU would run,
not a like-for-like ratio.

Attention shapes are GPT-2 124M's too (H 12, D 64). Decode reads the caches of a different layer each call, as
the model does (12 layers: 75 MB of K and V at B=1 S=1024, 604 MB at B=8 S=1024, so whether they come from a
large L3 or from DRAM depends on the machine); its GB/s counts the K and V bytes read per call. Sampling is over GPT-2's
50,257 logits; the "hf" rows are what Hugging Face `generate` does per step (its warpers, then softmax and
torch.multinomial), for comparison with ANCHORS.md.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from aigc_rt import _C
from aigc_rt.backends import get_backend
from aigc_rt.bench import TORCH_DTYPES, dynq_linear, int4_linear, onednn_linear
from aigc_rt.format import INT4_GROUP, quantize_int4, quantize_int8
from aigc_rt.sampling import SamplingParams

N_LAYER, H, D, V = 12, 12, 64, 50257
BACKENDS = {name: get_backend(name, "cpu") for name in ("torch", "cpu")}
RESULTS: dict[str, dict[str, float]] = {}  # group -> impl -> median seconds
BYTES: dict[str, int] = {}  # group -> bytes read per call (decode)


def measure(benchmark, group: str, impl: str, fn) -> None:
    benchmark.group = group
    benchmark(fn)
    if benchmark.stats is not None:  # None under --benchmark-disable
        RESULTS.setdefault(group, {})[impl] = benchmark.stats.stats.median


def write_ratio_table(tr):
    tr.write_line("")
    tr.write_line(f"{'group':<40}{'torch us':>11}{'hf us':>10}{'cpu us':>10}{'torch/cpu':>11}{'cpu GB/s':>10}")
    for group, r in RESULTS.items():
        for impl in [k for k in r if k.startswith("cpu")] or ["cpu"]:  # one line per cpu kernel (per ISA)
            name = group + impl[3:]
            us = {k: f"{v * 1e6:.1f}" for k, v in r.items()}
            ratio = f"{r['torch'] / r[impl]:.2f}x" if "torch" in r and impl in r else "-"
            gbs = f"{BYTES[group] / r[impl] / 1e9:.1f}" if group in BYTES and impl in r else ""
            tr.write_line(f"{name:<40}{us.get('torch', '-'):>11}{us.get('hf', ''):>10}{us.get(impl, '-'):>10}"
                          f"{ratio:>11}{gbs:>10}")


@pytest.fixture(scope="module", autouse=True)
def ratio_table(request):
    yield
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    if not RESULTS or tr is None:
        return
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        write_ratio_table(tr)


# -- linear ------------------------------------------------------------------------------------------------
C = 768  # GPT-2 124M


@pytest.fixture(scope="module")
def block_weights() -> list[torch.Tensor]:
    """The 48 (out, in) block matrices of a GPT-2 124M-sized stack, fp32."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * N_LAYER
    return [torch.randn(shape, generator=g) * 0.02 for shape in shapes]


def torch_linear(w: torch.Tensor, dtype: str, rows: int):
    """The fastest PyTorch linear of that dtype on these CPUs (aigc_rt/bench.py measured them in decode)."""
    if dtype == "int8":
        return dynq_linear(w, None)
    if dtype == "int4":
        f = int4_linear(w, None)
        return lambda x: f(x.bfloat16())
    if dtype == "fp16":
        wh = w.half()
        return lambda x: torch.nn.functional.linear(x.half(), wh)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    f = onednn_linear(w, None, dt, rows)
    return lambda x: f(x.to(dt))


def cpu_linear(w: torch.Tensor, dtype: str) -> _C.PackedLinear:
    if dtype in ("int8", "int4"):
        q, scale = (quantize_int8 if dtype == "int8" else quantize_int4)(w)
        return BACKENDS["cpu"].prepare_linear(q, None, scale)
    return BACKENDS["cpu"].prepare_linear(w.to(TORCH_DTYPES[dtype]), None)


WEIGHT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5 + 4 / INT4_GROUP}  # int4: + its scales


@pytest.mark.parametrize("impl", ["torch", "avx512", "avx512f", "avx2"])
@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "int8", "int4"])
def test_linear(benchmark, block_weights, impl, rows, dtype):
    x = {K: torch.randn(rows, K, generator=torch.Generator().manual_seed(1)) for K in (C, 4 * C)}
    group = f"linear {dtype} rows={rows}"
    BYTES[group] = int(sum(w.numel() for w in block_weights) * WEIGHT_BYTES[dtype])
    if impl == "torch":
        calls = [(torch_linear(w, dtype, rows), x[w.shape[1]]) for w in block_weights]
        measure(benchmark, group, "torch", lambda: [f(xi) for f, xi in calls])
        return
    _C.set_linear_isa(impl)
    try:
        if _C.linear_isa(dtype) != impl:
            pytest.skip(f"this CPU has no {impl} kernel for {dtype} weights")
        lins = [cpu_linear(w, dtype) for w in block_weights]
        calls = [(lin, x[lin.in_features], torch.empty(rows, lin.out_features)) for lin in lins]
        measure(benchmark, group, f"cpu {impl}",
                lambda: [_C.linear(xi, lin, 0, out) for lin, xi, out in calls])
    finally:
        _C.set_linear_isa("auto")


# -- attention ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["torch", "cpu"])
@pytest.mark.parametrize("B,S", [(1, 160), (1, 1024), (8, 160), (8, 1024)])
def test_attention_decode(benchmark, impl, B, S):
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(N_LAYER, B, H, S, D, generator=g)  # (n_layer, B, H, S, D), as the model's KV cache
    v_cache = torch.randn(N_LAYER, B, H, S, D, generator=g)
    q = torch.randn(B, 3, H, D, generator=g)[:, 0]  # (B, H, D) view of a qkv row, as the model passes it
    lengths = torch.full((B,), S)
    be, layer = BACKENDS[impl], itertools.cycle(range(N_LAYER))

    def step():
        i = next(layer)
        return be.attention_decode(q, k_cache[i], v_cache[i], lengths, S)

    group = f"decode B={B} S={S}"
    BYTES[group] = 2 * B * H * S * D * 4
    measure(benchmark, group, impl, step)


@pytest.mark.parametrize("impl", ["torch", "cpu"])
@pytest.mark.parametrize("T", [32, 128, 512])
def test_attention_prefill(benchmark, impl, T):
    qkv = torch.randn(1, T, 3, H, D, generator=torch.Generator().manual_seed(0))
    q, k, v = (x.transpose(1, 2) for x in qkv.unbind(2))  # (B, H, T, D) views, as the model makes them
    be = BACKENDS[impl]
    measure(benchmark, f"prefill B=1 T={T}", impl, lambda: be.attention_prefill(q, k, v))


# -- sampling ----------------------------------------------------------------------------------------------
SAMPLING = {  # name -> (params, batch)
    "greedy": (SamplingParams(), 1),
    "temperature 0.9": (SamplingParams(do_sample=True, temperature=0.9), 1),
    "top-k 50, T 0.7": (SamplingParams(do_sample=True, temperature=0.7, top_k=50), 1),
    "top-p 0.9": (SamplingParams(do_sample=True, top_p=0.9), 1),
    "top-p 0.9, B=8": (SamplingParams(do_sample=True, top_p=0.9), 8),
}


def hf_sampler(params: SamplingParams):
    """What HF generate does per step: greedy argmax, or its warpers then softmax + torch.multinomial."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(TopPLogitsWarper(params.top_p))

    def sample(logits):
        if not params.do_sample:
            return logits.argmax(dim=-1)
        for w in warpers:
            logits = w(None, logits)
        return torch.multinomial(logits.softmax(dim=-1), 1)[:, 0]

    return sample


@pytest.mark.parametrize("impl", ["torch", "hf", "cpu"])
@pytest.mark.parametrize("name", list(SAMPLING))
def test_sampling(benchmark, impl, name):
    params, B = SAMPLING[name]
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(0)) * 3  # (B, V)
    u = torch.rand(B, generator=torch.Generator().manual_seed(1))
    if impl == "hf":
        fn = hf_sampler(params)
        measure(benchmark, f"sample V=50257 {name}", impl, lambda: fn(logits))
    else:
        be = BACKENDS[impl]
        measure(benchmark, f"sample V=50257 {name}", impl, lambda: be.sample(logits, params, u, None))
