"""C++ attention (csrc/cpu/attention.cpp) vs the torch backend, fp32 on odd shapes (decode: fp32 and bf16 KV
caches), once per ISA.

The reference is the torch backend run in fp64 on the same inputs; our fp32 results must match it within
(fp32, atol=1e-5, rtol=1e-5). Decode caches hold NaN in every slot at or past a row's length: none may leak.
"""
import pytest
import torch

from aigc_rt import _C
from aigc_rt.backends import get_backend

ATOL, RTOL = 1e-5, 1e-5  # fp32 vs the fp64 reference
REF = get_backend("torch", "cpu")


def assert_close(got, want, what):
    err = (got.double() - want).abs().max().item()
    assert torch.allclose(got.double(), want, atol=ATOL, rtol=RTOL), f"{what}: max abs err {err:.3g}"


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def model_layout(B, T, H, D, seed):
    """q, k, v as the model makes them: (B, H, T, D) views of one packed (B, T, 3, H, D) qkv tensor."""
    qkv = randn(B, T, 3, H, D, seed=seed)
    return tuple(x.transpose(1, 2) for x in qkv.unbind(2))


PREFILL_SHAPES = [  # (B, H, T, D): B 1,3,5; H 1,3,12; T 1,3,17,111,500,1023; D 32,48,64,80,96,100
    (1, 1, 1, 64), (3, 3, 17, 48), (5, 1, 3, 32), (1, 12, 111, 64), (1, 3, 500, 100), (1, 1, 1023, 80),
    (3, 12, 17, 96), (5, 3, 111, 100),
]


@pytest.mark.parametrize("B,H,T,D", PREFILL_SHAPES)
def test_prefill_matches_torch(isa, B, H, T, D):
    assert _C.simd_isa() == isa
    q, k, v = model_layout(B, T, H, D, seed=B * 1000 + T)  # strided views: the kernel reads them in place
    want = REF.attention_prefill(q.double(), k.double(), v.double())
    got = _C.attention_prefill(q, k, v)
    assert got.shape == (B, H, T, D)
    assert_close(got, want, f"{isa} prefill {(B, H, T, D)}")
    # contiguous inputs give the same result; the output is laid out (B, T, H, D), so the model's
    # transpose(1, 2).reshape(B * T, H * D) is free
    assert torch.equal(_C.attention_prefill(q.contiguous(), k.contiguous(), v.contiguous()), got)
    assert got.transpose(1, 2).is_contiguous()


def planted_cache(B, H, S, D, lengths, seed):
    """(n_layer=2, B, H, S, D) caches whose slots at or past each row's length hold NaN; returns layer 1."""
    k, v = randn(2, 2, B, H, S, D, seed=seed).unbind(0)
    for b, n in enumerate(lengths.tolist()):
        k[:, b, :, n:] = float("nan")
        v[:, b, :, n:] = float("nan")
    return k[1], v[1]


DECODE_SHAPES = [  # (B, H, S, D); odd D: a bf16 row's last value pairs with padding (Vec::load_pairs)
    (1, 1, 1, 64), (3, 3, 17, 48), (5, 12, 111, 64), (1, 3, 500, 100), (1, 1, 1023, 80), (3, 1, 3, 32),
    (5, 3, 111, 96), (1, 12, 160, 64), (2, 3, 40, 17), (3, 2, 33, 1), (1, 1, 70, 129),
]


@pytest.mark.parametrize("B,H,S,D", DECODE_SHAPES)
@pytest.mark.parametrize("splits", [0, 1, 3, 7], ids=["auto", "1", "3", "7"])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["fp32-cache", "bf16-cache"])
def test_decode_matches_torch_and_never_reads_past_length(isa, B, H, S, D, splits, kv_dtype):
    """bf16 caches: the kernel widens them exactly, so the fp64 reference on the same bf16 values is the
    target at the same fp32 tolerance."""
    lengths = torch.randint(1, S + 1, (B,), generator=torch.Generator().manual_seed(S + B))
    lengths[0] = S  # one full row
    k_cache, v_cache = planted_cache(B, H, S + 2, D, lengths, seed=S * 7 + D)  # a cache longer than max_len
    k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    qkv = randn(B, 3, H, D, seed=D)
    q = qkv[:, 0]  # (B, H, D) view with the model's strides
    max_len = int(lengths.max())
    want = REF.attention_decode(q.double(), k_cache.double(), v_cache.double(), lengths, max_len)
    got = _C.attention_decode(q, k_cache, v_cache, lengths, max_len, splits=splits)
    assert not got.isnan().any(), f"{isa}: NaN from a cache slot past a row's length leaked"
    assert_close(got, want, f"{isa} decode {(B, H, S, D)} splits={splits}")


def test_decode_length_one_returns_first_value_row(isa):
    """A row that sees one position returns that position's value exactly, whatever its score."""
    k_cache, v_cache = planted_cache(2, 3, 9, 17, torch.tensor([1, 1]), seed=3)
    got = _C.attention_decode(randn(2, 3, 17, seed=4) * 100, k_cache, v_cache, torch.tensor([1, 1]), 1)
    assert torch.equal(got, v_cache[:, :, 0])


def test_nan_in_inputs_is_not_hidden(isa):
    """NaN in a live query/key must reach the output (as in torch), so bad weights are caught by the sampler."""
    q, k, v = (randn(1, 2, 5, 16, seed=s) for s in (1, 2, 3))
    q[0, 1, 3, 0] = float("nan")
    got = _C.attention_prefill(q, k, v)
    assert got[0, 1, 3].isnan().all() and not got[0, 0].isnan().any() and not got[0, 1, :3].isnan().any()
    got = _C.attention_decode(q[:, :, 3], k, v, torch.tensor([5]), 5)
    assert got[0, 1].isnan().all() and not got[0, 0].isnan().any()


def test_out_parameter(isa):
    q, k, v = model_layout(2, 7, 3, 24, seed=5)
    want = _C.attention_prefill(q, k, v)
    out = torch.full((2, 3, 7, 24), float("nan"))
    assert _C.attention_prefill(q, k, v, out=out) is out and torch.equal(out, want)
    out_t = torch.empty(2, 7, 3, 24).transpose(1, 2)  # any strides with a contiguous last dim
    assert _C.attention_prefill(q, k, v, out=out_t) is out_t and torch.equal(out_t, want)
    lengths = torch.tensor([7, 4])
    want = _C.attention_decode(q[:, :, 0], k, v, lengths, 7)
    out = torch.empty(2, 3, 24)
    assert _C.attention_decode(q[:, :, 0], k, v, lengths, 7, out=out) is out and torch.equal(out, want)


def test_cpu_backend_uses_the_kernels():
    be = get_backend("cpu")
    q, k, v = model_layout(3, 17, 3, 48, seed=6)
    assert_close(be.attention_prefill(q, k, v), REF.attention_prefill(q.double(), k.double(), v.double()), "prefill")
    lengths = torch.tensor([17, 1, 9])
    want = REF.attention_decode(q[:, :, 0].double(), k.double(), v.double(), lengths, 17)
    out = torch.empty(3, 3, 48)
    assert be.attention_decode(q[:, :, 0], k, v, lengths, 17, out=out) is out
    assert_close(out, want, "decode")


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["fp32-cache", "bf16-cache"])
@pytest.mark.parametrize("B,H,S,D", [(1, 1, 1, 64), (3, 5, 17, 48), (2, 12, 40, 100)])
def test_write_kv_matches_torch_backend(B, H, S, D, kv_dtype):
    """_C.write_kv == the torch backend's scatter, bit for bit (bf16: round to nearest even, as .to()), and
    leaves every other slot alone."""
    k_cache, v_cache = (randn(B, H, S, D, seed=s).to(kv_dtype) for s in (1, 2))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    qkv = randn(B, 3, H, D, seed=3) * 1e3  # k, v: (B, H, D) strided views, as the model passes them
    positions = torch.randint(0, S, (B,), generator=torch.Generator().manual_seed(B + S))
    REF.write_kv(want_k, want_v, positions, qkv[:, 1], qkv[:, 2])
    _C.write_kv(k_cache, v_cache, positions, qkv[:, 1], qkv[:, 2])
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_write_kv_bad_arguments():
    kc, vc, pos, k = torch.zeros(2, 3, 10, 8), torch.zeros(2, 3, 10, 8), torch.tensor([0, 9]), torch.randn(2, 3, 8)
    bad = [
        (dict(positions=torch.tensor([0, 10])), r"positions\[1\] = 10 is outside \[0, 10\)"),
        (dict(positions=torch.tensor([-1, 0])), r"positions\[0\] = -1"),
        (dict(positions=torch.tensor([0, 1], dtype=torch.int32)), "positions must be a contiguous CPU int64"),
        (dict(k=torch.randn(2, 3, 7)), r"k, v must be \(2, 3, 8\)"),
        (dict(v=k.double()), "k, v must be float32"),
        (dict(k_cache=kc.half(), v_cache=vc.half()), "write_kv: k_cache must be float32 or bfloat16"),
        (dict(k_cache=kc.bfloat16()), "differ"),
    ]
    for change, message in bad:
        args = dict(k_cache=kc, v_cache=vc, positions=pos, k=k, v=k) | change
        with pytest.raises(ValueError, match=message):
            _C.write_kv(args["k_cache"], args["v_cache"], args["positions"], args["k"], args["v"])


def test_bad_arguments_raise_value_error():
    q, kc, vc, n = torch.randn(2, 3, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8), torch.tensor([4, 10])
    bad_decode = [
        (dict(lengths=torch.tensor([0, 4])), r"lengths\[0\] = 0 is outside \[1, max_len = 10\]"),
        (dict(lengths=torch.tensor([4, 11]), max_len=10), r"lengths\[1\] = 11"),
        (dict(max_len=11), "max_len 11 is outside"),
        (dict(lengths=torch.tensor([4, 10], dtype=torch.int32)), "lengths must be a contiguous CPU int64"),
        (dict(lengths=torch.tensor([4])), r"lengths must be .* shape \(2\)"),
        (dict(q=q.double()), "q must be float32"),
        (dict(q=torch.randn(2, 3, 7)), "do not match q"),
        (dict(v_cache=torch.randn(2, 3, 9, 8)), "differ"),
        (dict(k_cache=torch.randn(2, 3, 8, 10).transpose(2, 3)), "k_cache must be contiguous in its last dim"),
        (dict(q=torch.randn(1, 1, 513), k_cache=torch.randn(1, 1, 10, 513), v_cache=torch.randn(1, 1, 10, 513),
              lengths=torch.tensor([3])), "head dim 513"),
        (dict(out=torch.empty(2, 3, 9)), "out has shape"),
        (dict(out=q), "out overlaps an input"),
        (dict(splits=-1), "splits must be >= 0"),
        (dict(k_cache=kc.bfloat16()), "k_cache is BFloat16 but v_cache is Float"),
        (dict(k_cache=kc.half(), v_cache=vc.half()), "k_cache must be float32 or bfloat16"),
    ]
    for change, message in bad_decode:
        args = dict(q=q, k_cache=kc, v_cache=vc, lengths=n, max_len=10) | change
        with pytest.raises(ValueError, match=message):
            _C.attention_decode(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("lengths"),
                                args.pop("max_len"), **args)
    x = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="must have the same shape"):
        _C.attention_prefill(x, x, torch.randn(1, 2, 6, 8))
    with pytest.raises(ValueError, match="q must have 4 dims"):
        _C.attention_prefill(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="out overlaps an input"):
        _C.attention_prefill(x, x.clone(), x.clone(), out=x)
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        _C.set_simd_isa("sse9")

