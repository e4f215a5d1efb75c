"""C++ linear layer (csrc/cpu/linear*.cpp) and embedding (csrc/cpu/embedding.cpp) vs plain-PyTorch fp32 math,
on odd shapes, for every weight dtype, with and without bias and GELU, on every ISA this CPU has (AMX, AVX-512,
AVX2, portable C++; the AMX kernels take 4+ rows and hand fewer to AVX-512).

What the kernel computes, per weight dtype (the torch backend is the reference op, see torch_backend.linear):
  fp32  y = x @ W^T      fp16  y = fp16(x) @ W^T      bf16  y = bf16(x) @ W^T   (fp32 accumulation, as the reference)
  int8  y = xq @ (q * s)^T where xq is x quantised to int8 per block of 64 inputs (scale max|x_b| / 127),
        which the reference (fp32 x) does not do: the difference is bounded by sum_k |W[o, k]| * sx_b(k) / 2.
  int4  y = xq @ (q * s_group)^T, the same activations (int4 weights need an even number of inputs: odd shapes
        get one input more).
Tolerances: fp32 rounding of a K-term sum, |err| <= SUM_RTOL * (|x| @ |W|^T + |b|), SUM_RTOL = 1e-5, plus (int8
vs the reference) that activation-quantisation bound; the int8 kernel is also checked against its own math
with the fp32 bound alone (int4 too; its ISAs also agree bit for bit).
"""
from __future__ import annotations

import math

import pytest
import torch

import aigc_rt
from aigc_rt import _C
from aigc_rt.backends.cpu import CpuBackend
from aigc_rt.backends.torch_backend import TorchBackend
from aigc_rt.format import dequantize_int4, quantize_int4, quantize_int8

SUM_RTOL = 1e-5
GELU_SLOPE = 1.13  # max |d GELU(y) / dy|: the epilogue can grow an input error by at most this much
# (N, in, out): every N in 1, 3, 17, 64, 111 and every in/out in 1, 3, 17, 111, 500, 1023 at least once
SHAPES = [(1, 1, 1), (1, 17, 3), (3, 3, 17), (17, 111, 500), (64, 500, 111), (111, 1023, 17), (1, 1023, 1023),
          (3, 500, 1023), (64, 17, 111), (111, 111, 3)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}
QUANTIZED = ("int8", "int4")  # activations quantised to int8 blocks in the kernel
EPILOGUES = {"none": (False, None), "bias": (True, None), "gelu": (False, "gelu_tanh"), "bias+gelu": (True, "gelu_tanh"),
             "bias+relu": (True, "relu")}
CPU, REF = CpuBackend(torch.device("cpu")), TorchBackend(torch.device("cpu"))


# every kernel: (ISA, weight dtype); AMX has no fp32, fp16 or int4 multiply; avx512f (AVX-512 without bf16 / VNNI) has
# bf16, int8 and int4 kernels of its own (fp32 and fp16: the avx512 ones)
KERNELS = [(isa, dt) for dt in DTYPES for isa in ("amx", "avx512", "avx512f", "avx2", "scalar")
           if (isa != "amx" or dt in ("bf16", "int8")) and (isa != "avx512f" or dt in ("bf16", "int8", "int4"))]


def _forced(isa, dtype):
    """Force the linear kernels to one ISA (skipped where this CPU lacks it); back to the best one afterwards."""
    _C.set_linear_isa(isa)
    used = _C.linear_isa(dtype)
    if used != isa:
        _C.set_linear_isa("auto")
        pytest.skip(f"this CPU has no {isa} kernel for {dtype} weights")
    yield isa, dtype
    _C.set_linear_isa("auto")


@pytest.fixture(params=KERNELS, ids=[f"{isa}-{dt}" for isa, dt in KERNELS])
def kernel(request):
    yield from _forced(*request.param)


INT8_ISAS = [isa for isa, dt in KERNELS if dt == "int8"]
INT4_ISAS = [isa for isa, dt in KERNELS if dt == "int4"]


@pytest.fixture(params=INT8_ISAS)
def int8_kernel(request):
    yield from _forced(request.param, "int8")


@pytest.fixture(params=INT4_ISAS)
def int4_kernel(request):
    yield from _forced(request.param, "int4")


def _problem(N, K, O, dtype, bias, seed=0):
    """x (N, K), the reference Linear and the cpu one; int4: K + 1 inputs where K is odd."""
    K += dtype == "int4" and K % 2
    g = torch.Generator().manual_seed(seed * 7919 + N * 31 + K * 17 + O)
    x = torch.randn(N, K, generator=g) * 2
    w = torch.randn(O, K, generator=g) / math.sqrt(K)
    b = torch.randn(O, generator=g) if bias else None
    if dtype in QUANTIZED:
        q, s = (quantize_int8 if dtype == "int8" else quantize_int4)(w)
        return x, REF.prepare_linear(q, b, s), CPU.prepare_linear(q, b, s)
    w = w.to(DTYPES[dtype])
    return x, REF.prepare_linear(w, b), CPU.prepare_linear(w, b)


def _dense(lin) -> torch.Tensor:
    """The reference Linear's weight as fp32 (out, in)."""
    return lin.dequantized()


def quantized_activations(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """The int8 kernel's activations, dequantised to float64 (csrc/cpu/linear.cpp quantize_row)."""
    N, K = x.shape
    xb = torch.nn.functional.pad(x, (0, -K % block)).view(N, -1, block)  # (N, blocks, 64)
    amax = xb.abs().amax(-1, keepdim=True)
    # 127 / amax as the kernel divides (torch's scalar / tensor is reciprocal(amax) * 127, which can be an ulp off and
    # move a tie: seen at K = 112, x = -3.0875666 with amax = 5.724393, x * 127 / amax = -68.5 exactly)
    inv = torch.full_like(amax, 127.0) / amax
    q = torch.round(xb * inv).clamp(-127, 127).nan_to_num(0)  # amax == 0 -> q = 0
    return (q.double() * (amax / 127).double()).view(N, -1)[:, :K]


def _sum_bound(x, lin) -> torch.Tensor:
    """|x| @ |W|^T + |b|: the scale of the fp32 rounding error of each output."""
    mag = x.abs().double() @ _dense(lin).abs().double().T
    return mag + (lin.bias.abs().double() if lin.bias is not None else 0)


def _check(got, want, tol, what):
    err = (got.double() - want.double()).abs()
    worst = (err - tol).argmax()
    assert bool((err <= tol).all()), (f"{what}: max abs error {err.max().item():.3g}; worst excess at flat index "
                                      f"{worst.item()}: error {err.flatten()[worst].item():.3g} > tolerance "
                                      f"{tol.flatten()[worst].item():.3g}")


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("N,K,O", SHAPES)
def test_linear_matches_reference(kernel, N, K, O, epilogue):
    isa, dtype = kernel
    bias, act = EPILOGUES[epilogue]
    x, ref_lin, cpu_lin = _problem(N, K, O, dtype, bias)
    got = CPU.linear(x, cpu_lin, act=act)
    want = REF.linear(x, ref_lin, act=act)
    assert got.shape == (N, O) and got.dtype == torch.float32
    tol = SUM_RTOL * GELU_SLOPE * _sum_bound(x, ref_lin) + 1e-6
    if dtype in QUANTIZED:  # activations quantised per block of 64: |x - xq| <= sx / 2 elementwise
        half_step = (x.double() - quantized_activations(x)).abs().max(-1, keepdim=True).values  # (N, 1)
        tol = tol + GELU_SLOPE * half_step * _dense(ref_lin).abs().double().sum(-1)
        exact = quantized_activations(x) @ _dense(ref_lin).double().T
        if bias:
            exact = exact + ref_lin.bias.double()
        if act == "gelu_tanh":
            exact = torch.nn.functional.gelu(exact, approximate="tanh")
        elif act == "relu":
            exact = exact.relu()
        _check(got, exact, SUM_RTOL * GELU_SLOPE * _sum_bound(x, ref_lin) + 1e-6,
               f"{isa} {dtype} {N}x{K}x{O} {epilogue} vs its quantised-activation math")
    _check(got, want, tol, f"{isa} {dtype} {N}x{K}x{O} {epilogue} vs the torch backend")


@pytest.mark.parametrize("pattern", ["all +127", "alternating", "all -127"])
def test_int8_extreme_products_are_exact(int8_kernel, pattern):
    """Weights and quantised activations at +-127, the largest int8 products: the int16 pair sums of the AVX2
    kernel (127 * 127 * 2 = 32258) and the int32 block sums of every kernel stay exact."""
    isa, _ = int8_kernel
    K, O = 320, 19
    q = torch.full((O, K), 127, dtype=torch.int8)
    if pattern == "alternating":
        q[:, 1::2] = -127
    elif pattern == "all -127":
        q = -q
    scale = torch.linspace(0.5, 2.0, O)
    x = torch.ones(3, K) * torch.tensor([[1.0], [-2.0], [0.25]])  # each block quantises to +-127 exactly
    got = CPU.linear(x, CPU.prepare_linear(q, None, scale))
    want = x.double() @ (q.double() * scale.double()[:, None]).T
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), f"{isa} {pattern}: max abs error {err:.3g}"


def test_linear_writes_into_out_and_leading_dims(kernel):
    dtype = kernel[1]
    x, ref_lin, cpu_lin = _problem(6, 111, 17, dtype, bias=True)
    out = torch.full((2, 3, 17), float("nan"))
    got = CPU.linear(x.view(2, 3, -1), cpu_lin, out=out)
    assert got.data_ptr() == out.data_ptr() and got.shape == (2, 3, 17)
    want = REF.linear(x, ref_lin).view(2, 3, 17)
    assert torch.allclose(got, want, atol=5e-2 if dtype in QUANTIZED else 1e-4, rtol=0), \
        f"max abs error {(got - want).abs().max():.3g}"


@pytest.mark.parametrize("N,K,O", [(1, 17, 3), (17, 111, 500), (64, 1023, 111)])
def test_linear_adds_into_residual(kernel, N, K, O):
    """With a residual, the epilogue adds y into it (a sub-layer's output into the residual stream): residual
    becomes exactly residual + y, y still lands in out, and the residual is what the backend returns."""
    dtype = kernel[1]
    x, ref_lin, cpu_lin = _problem(N, K, O, dtype, bias=True)
    r0 = torch.randn(N, O, generator=torch.Generator().manual_seed(N + K + O))
    for act in (None, "gelu_tanh", "relu"):
        y = CPU.linear(x, cpu_lin, act=act)
        r, out = r0.clone(), torch.empty(N, O)
        assert CPU.linear(x, cpu_lin, act=act, out=out, residual=r) is r
        assert torch.equal(out, y), f"{kernel} {N}x{K}x{O} {act}: y changed when a residual is given"
        assert torch.equal(r, r0 + y), f"{kernel} {N}x{K}x{O} {act}: residual is not residual + y"
        if dtype not in QUANTIZED:  # (y itself is checked in test_linear_matches_reference)
            want = REF.linear(x, ref_lin, act=act, residual=r0.clone())
            err = (r - want).abs().max().item()
            assert err <= 1e-4, f"{kernel} {N}x{K}x{O} {act}: max abs error {err:.3g} against the torch backend"


@pytest.mark.parametrize("rows", [3, 17])
def test_non_finite_inputs_reach_the_output(kernel, rows):
    """A NaN/inf in x must make its output row non-finite (the runtime checks logits for that)."""
    x, _, cpu_lin = _problem(rows, 130, 9, kernel[1], bias=True)
    x[0, 5], x[2, 129] = float("nan"), float("inf")
    y = CPU.linear(x, cpu_lin)
    assert not y[0].isfinite().any() and not y[2].isfinite().any(), y
    assert y[1].isfinite().all() and y[3:].isfinite().all()


@pytest.mark.parametrize("pattern", ["q = -8", "q = 7", "alternating"])
def test_int4_extreme_products_are_exact(int4_kernel, pattern):
    """int4 weights at the ends of their range (u = q + 8 at 0 and 15) times activations that quantise to +-127:
    the AVX2 kernel's int16 sums of two groups' pairs (2 * 2 * 15 * 127) and every kernel's block sums and offsets
    stay exact."""
    isa, _ = int4_kernel
    K, O = 320, 19
    u = torch.full((O, K), {"q = -8": 0, "q = 7": 15, "alternating": 15}[pattern], dtype=torch.uint8)
    if pattern == "alternating":
        u[:, 1::2] = 0
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    scale = torch.linspace(0.5, 2.0, O * K // 64).reshape(O, K // 64)
    x = torch.ones(3, K) * torch.tensor([[1.0], [-2.0], [0.25]])  # each block quantises to +-127 exactly
    got = CPU.linear(x, CPU.prepare_linear(packed, None, scale))
    want = x.double() @ dequantize_int4(packed, scale).double().T
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), f"{isa} {pattern}: max abs error {err:.3g}"


@pytest.mark.parametrize("N,K,O", [(1, 70, 17), (2, 128, 33), (5, 322, 47), (8, 768, 64), (33, 130, 3)])
def test_int4_kernels_agree_bit_for_bit(N, K, O):
    """Every int4 kernel (AVX-512 VNNI, AVX2, portable) sums each block exactly in int32 and then makes the same
    float operations in the same order: their outputs are identical, for one row (the single-row AVX-512 path) and
    tiles of several."""
    g = torch.Generator().manual_seed(N + K + O)
    x = torch.randn(N, K, generator=g)
    q, s = quantize_int4(torch.randn(O, K, generator=g))
    lin = CPU.prepare_linear(q, None, s)
    outs = {}
    for isa in INT4_ISAS:
        _C.set_linear_isa(isa)
        try:
            if _C.linear_isa("int4") == isa:
                outs[isa] = CPU.linear(x, lin)
        finally:
            _C.set_linear_isa("auto")
    assert "scalar" in outs and len(outs) >= 2, outs.keys()
    for isa, y in outs.items():
        assert torch.equal(y, outs["scalar"]), f"{isa} vs scalar: max abs difference {(y - outs['scalar']).abs().max()}"


def test_set_simd_isa_caps_the_linear_kernels_too():
    """One switch for the whole extension: set_simd_isa lowers linear's choice as well (set_linear_isa only
    caps it further, e.g. AVX-512 instead of AMX)."""
    previous = _C.set_simd_isa("scalar")
    try:
        assert [_C.linear_isa(dt) for dt in DTYPES] == ["scalar"] * len(DTYPES)
        if previous != "scalar" and _C.set_simd_isa("avx2") == "scalar":
            assert [_C.linear_isa(dt) for dt in DTYPES] == ["avx2"] * len(DTYPES)
    finally:
        _C.set_simd_isa(previous)
    assert _C.linear_isa("fp32") != "scalar" or previous == "scalar"


def test_packed_linear_keeps_its_shape_and_parts():
    q, scale = quantize_int8(torch.randn(17, 70))
    bias = torch.randn(17)
    lin = _C.PackedLinear(q, bias, scale)
    assert (lin.in_features, lin.out_features, lin.dtype) == (70, 17, "int8")
    assert lin.weight.shape == (2, 64 * 16 * 2) and lin.weight.dtype == torch.uint8  # 2 panels of 16 rows x 128 k
    assert lin.bias.data_ptr() == bias.data_ptr() and lin.scale.data_ptr() == scale.data_ptr()
    assert _C.PackedLinear(torch.randn(3, 5).bfloat16()).weight.shape == (1, 32 * 16)  # K padded to 32
    q4, scale4 = quantize_int4(torch.randn(17, 70))
    lin = _C.PackedLinear(q4, bias, scale4)
    assert (lin.in_features, lin.out_features, lin.dtype, lin.scale) == (70, 17, "int4", None)
    assert lin.weight.shape == (2, 2 * (512 + 64)) and lin.weight.dtype == torch.uint8  # 2 blocks of nibbles + scales


def test_quantize_int4_round_trip():
    """Per group of 64 inputs: the value of largest magnitude is exact (q = -8), every other is within half a step
    (or one step, where it has the other sign and rounds to 8, past the top level 7); an all-zero group has scale 0;
    a row of 70 inputs has a partial second group."""
    w = torch.randn(7, 70) * torch.logspace(-3, 2, 7)[:, None]
    w[3] = 0
    w[5, 64:] = 0
    q, s = quantize_int4(w)
    assert q.dtype == torch.uint8 and q.shape == (7, 35) and s.shape == (7, 2) and (s[3] == 0).all() and s[5, 1] == 0
    d = dequantize_int4(q, s)
    scale = s.repeat_interleave(64, dim=1)[:, :70]
    clamped = torch.round(w / torch.where(scale != 0, scale, 1)) > 7
    bound = torch.where(clamped, 1.0, 0.5) * scale.abs() * (1 + 1e-6) + 1e-12
    err = (d - w).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, worst excess {(err - bound).max():.3g}"
    big = w.abs().reshape(7, -1).argmax(1)
    assert torch.equal(d[torch.arange(7), big], w[torch.arange(7), big])
    with pytest.raises(ValueError, match="even number of inputs"):
        quantize_int4(torch.randn(3, 5))


def test_quantize_int8_round_trip():
    w = torch.randn(7, 300) * torch.logspace(-3, 2, 7)[:, None]
    w[3] = 0
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (7,) and s[3] == 0 and q.abs().max() <= 127
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-6) + 1e-12).all()), f"max error / scale {(err / s[:, None]).max()}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
def test_embedding_matches_reference(dtype):
    g = torch.Generator().manual_seed(3)
    table = torch.randn(1003, 17, generator=g)
    scale = None
    if dtype == "int8":
        table, scale = quantize_int8(table)
    else:
        table = table.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    ids = torch.tensor([[0, 1002, 5], [7, 7, 500]])
    want = REF.embedding(table, ids, scale=scale)
    out = torch.empty(2, 3, 17)
    got = CPU.embedding(table, ids, scale=scale, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, want), f"max abs error {(got - want).abs().max():.3g}"
    # with a position embedding added (GPT-2's wte[ids] + wpe[positions]): one fp32 add, as the reference's
    pos_table, positions = torch.randn(11, 17, generator=g), torch.tensor([[0, 10, 3], [3, 4, 5]])
    want = REF.embedding(table, ids, scale=scale, pos_table=pos_table, positions=positions)
    assert torch.equal(want, REF.embedding(table, ids, scale=scale) + pos_table[positions])
    got = CPU.embedding(table, ids, scale=scale, pos_table=pos_table, positions=positions)
    assert torch.equal(got, want), f"with positions: max abs error {(got - want).abs().max():.3g}"


def test_bad_arguments_raise_value_error():
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    q, s = quantize_int8(w)
    q4, s4 = quantize_int4(torch.randn(5, 70))
    lin = _C.PackedLinear(w, b)
    cases = [
        (lambda: _C.linear(x, _C.PackedLinear(torch.randn(5, 7))), "does not have 7 input features"),
        (lambda: _C.linear(x.double(), lin), "x must be Float"),
        (lambda: _C.linear(torch.randn(8, 3).t(), lin), "x must be contiguous"),
        (lambda: _C.linear(x, lin, out=torch.empty(3, 6)), r"out has shape \[3, 6\], expected \[3, 5\]"),
        (lambda: _C.linear(x, _C.PackedLinear(torch.randn(8, 8)), out=x), "out must not overlap x"),
        (lambda: _C.PackedLinear(w.double()), "weight dtype Double is not supported"),
        (lambda: _C.PackedLinear(w.t()), "non-empty contiguous 2-D"),
        (lambda: _C.PackedLinear(torch.randn(5, 0)), "non-empty contiguous 2-D"),
        (lambda: _C.PackedLinear(q), "scale is required for int8"),
        (lambda: _C.PackedLinear(w, scale=s), "scale is required for int8 and int4 weights and only for them"),
        (lambda: _C.PackedLinear(q, scale=s[:4]), r"scale has shape \[4\], expected \[5\]"),
        (lambda: _C.PackedLinear(torch.full((5, 8), -128, dtype=torch.int8), scale=s), r"lie in \[-127, 127\]"),
        (lambda: _C.PackedLinear(q4), "scale is required for int8 and int4"),
        (lambda: _C.PackedLinear(q4, scale=s4[:, :1].contiguous()), r"need contiguous float32 CPU scales \(5, 2\)"),
        (lambda: _C.PackedLinear(q4, scale=s4.double()), r"need contiguous float32 CPU scales"),
        (lambda: REF.prepare_linear(q4, b, s4[:4]), r"needs scales \(5, 2\), got \(4, 2\)"),
        (lambda: _C.PackedLinear(w, torch.randn(6)), r"bias has shape \[6\], expected \[5\]"),
        (lambda: _C.PackedLinear(w, b.double()), "bias must be a contiguous float32"),
        (lambda: CPU.linear(x, CPU.prepare_linear(w, b), act="gelu"), "unknown activation 'gelu'"),
        (lambda: REF.linear(x, REF.prepare_linear(w, b), act="gelu"), "unknown activation 'gelu'"),
        (lambda: CPU.prepare_linear(q, b), "scale is required for int8 and int4 weights"),
        (lambda: _C.embedding(w, torch.tensor([5])), r"id 5 is outside \[0, 5\)"),
        (lambda: _C.embedding(w, torch.tensor([-1])), "id -1 is outside"),
        (lambda: _C.embedding(q, torch.tensor([1])), "scale is required for an int8 table"),
        (lambda: _C.embedding(w, torch.tensor([1]), out=torch.empty(2, 8)), "out has shape"),
        (lambda: _C.embedding(w, torch.tensor([1]), pos_table=w), "pos_table and positions go together"),
        (lambda: REF.embedding(w, torch.tensor([1]), positions=torch.tensor([0])), "pos_table and positions go"),
        (lambda: _C.embedding(w, torch.tensor([1]), pos_table=w, positions=torch.tensor([5])),
         r"position 5 is outside \[0, 5\)"),
        (lambda: _C.embedding(w, torch.tensor([1]), pos_table=w[:, :4].contiguous(), positions=torch.tensor([0])),
         r"pos_table has shape \[5, 4\], expected \[P, 8\]"),
        (lambda: _C.embedding(w, torch.tensor([1]), pos_table=w, positions=torch.tensor([0, 1])),
         "positions has shape"),
        (lambda: _C.layernorm(x, torch.ones(8), torch.zeros(8), 1e-5, out=torch.empty(3, 7)), "out has shape"),
        (lambda: _C.linear(x, _C.PackedLinear(torch.randn(5, 8)), residual=torch.zeros(3, 4)),
         r"residual has shape \[3, 4\], expected \[3, 5\]"),
        (lambda: _C.linear(x, _C.PackedLinear(torch.randn(8, 8)), residual=x), "residual must not overlap x or out"),
        (lambda: _C.linear(x, _C.PackedLinear(torch.randn(5, 8)), residual=torch.zeros(5, 3).t()),
         "residual must be contiguous"),
        (lambda: _C.set_linear_isa("neon"), "unknown ISA 'neon'"),
        (lambda: _C.linear_isa("fp8"), "unknown weight dtype 'fp8'"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def _replayed_decode_allocations(m) -> int:
    """Bytes the profiler sees allocated by 3 replayed decode steps (after the recording one)."""
    cache = m.new_cache(2, m.config.n_positions)
    tokens, positions = torch.tensor([5, 6]), torch.tensor([4, 2])
    with torch.inference_mode():
        m.prefill(torch.randint(0, m.config.vocab_size, (2, 5)), cache)
        m.decode(tokens, positions, cache, 5)  # recorded
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            for step in range(3):
                positions += 1
                with torch.profiler.record_function("decode"):
                    m.decode(tokens, positions, cache, 6 + step)
    assert len(m.backend._replays[cache].program) > 0
    return next(e for e in prof.key_averages() if e.key == "decode").cpu_memory_usage


class _Traced:
    """A backend wrapper that puts each op call in a profiler scope named op::NAME."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def traced(*args, **kwargs):
            with torch.profiler.record_function("op::" + name):
                return attr(*args, **kwargs)
        return traced


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_decode_step_allocates_nothing_for_linear_and_layernorm(hf_odd, tmp_path, dtype):
    """The decode step writes every linear / layernorm / embedding result into the cache's Workspace: the
    profiler sees no memory allocated inside those ops or the sub-layer ops made of them (run eagerly), and the
    logits come back in the same buffer each step. Replayed (the cpu backend's default), the whole step allocates nothing."""
    m = aigc_rt.load(aigc_rt.convert(hf_odd[0], tmp_path / f"{dtype}.safetensors", dtype=dtype), backend="cpu")
    replayed = _replayed_decode_allocations(m)
    assert replayed == 0, f"a replayed decode step allocated {replayed} bytes"
    m.backend.replay = False
    m.backend = _Traced(m.backend)
    cache = m.new_cache(3, m.config.n_positions)
    tokens, positions = torch.tensor([5, 6, 7]), torch.tensor([4, 2, 3])
    with torch.inference_mode():
        m.prefill(torch.randint(0, m.config.vocab_size, (3, 5)), cache)
        first = m.decode(tokens, positions, cache, 5)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            for step in range(3):
                positions += 1
                logits = m.decode(tokens, positions, cache, 6 + step)
                assert logits.data_ptr() == first.data_ptr()
    ops = {e.key: e for e in prof.key_averages()}
    # the model's calls (the sub-layer ops run their linears and layernorms inside, traced with them)
    n = m.config.n_layer
    for op, calls in {"layernorm_linear": 1, "attention_block_decode": n, "mlp": n, "embedding": 1}.items():
        e = ops[f"op::{op}"]
        assert e.count == 3 * calls, f"op::{op} ran {e.count} times, expected {3 * calls}"
        assert e.cpu_memory_usage == 0, f"op::{op} allocated {e.cpu_memory_usage} bytes during 3 decode steps"


def test_relu_keeps_nan_and_bad_codes_are_refused():
    x = torch.randn(2, 9)
    x[1, 3] = float("nan")
    lin = CPU.prepare_linear(torch.randn(5, 9), torch.zeros(5))
    y = CPU.linear(x, lin, act="relu")
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any() and (y[0] >= 0).all()
    with pytest.raises(ValueError, match="unknown activation code 3"):
        _C.linear(x, lin, 3)
