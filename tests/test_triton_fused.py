"""The fused sub-layers of a decode step: kernels/mlp.py's MLP (x += proj(act(fc(LayerNorm(x))))) and
kernels/decode_attention.py's attention with its output projection (r += proj(attention), proj=), against the
plain-PyTorch fp32 references (linear.py's and decode_attention.py's, composed) and the torch backend; and the
triton backend's choice between each and its kernels apart. Under TRITON_INTERPRET=1 on small odd shapes
(several partials per group and several groups, a last slice and a last group cut short), on a GPU also at GPT-2
shapes."""
from __future__ import annotations

import functools

import pytest
import torch
import triton

from aigc_rt.backends import triton_backend
from aigc_rt.backends.torch_backend import Linear, TorchBackend
from aigc_rt.kernels import decode_attention, linear, mlp, utils
from test_triton_kernels import DEV, DTYPES, LINEAR_TOL, NORM_TOL, ON_GPU, assert_close, int8_weights, randn, shapes
from test_triton_kernels import pytestmark  # noqa: F401  (skip without a GPU/interpreter)


def operands(M: int, C: int, H: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """x (M, C) off-centre as a residual stream is; W1 (H, C), W2 (C, H) of `dtype` (int8 with per-row scales);
    biases; a LayerNorm over C."""
    x = randn(M, C, seed=seed + M + C + H, scale=3) + 1
    if dtype == torch.int8:
        (w1, s1), (w2, s2) = int8_weights(H, C, (seed + 1, seed + 2)), int8_weights(C, H, (seed + 3, seed + 4))
    else:
        w1, s1 = randn(H, C, seed=seed + 1, scale=C ** -0.5, dtype=dtype), None
        w2, s2 = randn(C, H, seed=seed + 3, scale=H ** -0.5, dtype=dtype), None
    return dict(x=x, w1=w1, b1=randn(H, seed=seed + 5), w2=w2, b2=randn(C, seed=seed + 6), scale1=s1, scale2=s2,
                norm=(randn(C, seed=seed + 7, scale=0.2) + 1, randn(C, seed=seed + 8, scale=0.2), 1e-5))


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """The LayerNorm'd row rounded to 16 bits may land on the other side of a rounding step than the
    reference's (different fp32 sum order): linear.py's tolerances for a LayerNorm prologue."""
    return NORM_TOL.get(dtype, LINEAR_TOL)


def run(o: dict, act="gelu_tanh", norm=True, biases=True, counters=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, reference) for the operands o: ours on a copy of x."""
    kw = dict(scale1=o["scale1"], scale2=o["scale2"], norm=o["norm"] if norm else None)
    b1, b2 = (o["b1"], o["b2"]) if biases else (None, None)
    x = o["x"].clone()
    got = mlp.mlp(x, o["w1"], b1, o["w2"], b2, act, counters=counters, **kw)
    assert got is x
    return got, mlp.reference(o["x"], o["w1"], b1, o["w2"], b2, act, **kw)


@pytest.mark.parametrize("M,C,H", shapes([(1, 40, 160), (3, 33, 130), (2, 70, 17), (1, 8, 600)],
                                         [(1, 768, 3072), (8, 1600, 6400)]))
@pytest.mark.parametrize("dtype", [*DTYPES, torch.int8], ids=["fp32", "bf16", "fp16", "int8"])
def test_mlp(M, C, H, dtype):
    """GPT-2's sub-layer (LayerNorm, biases, GELU) and the variants (ReLU, no LayerNorm, no biases, no
    activation); the counters are zeros again after every launch, and a second launch gives the same bits."""
    o = operands(M, C, H, dtype)
    counters = utils.new_counters(DEV)
    for act, norm, biases in (("gelu_tanh", True, True), ("relu", True, False), (None, False, True)):
        what = f"mlp {M}x{C}x{H} {dtype} act={act} norm={norm} biases={biases}"
        got, want = run(o, act, norm, biases, counters)
        assert_close(got, want, *tolerance(dtype), what)
        assert not counters.any(), f"{what}: counters left {counters.nonzero().flatten().tolist()}"
        again, _ = run(o, act, norm, biases, counters)
        assert torch.equal(got, again), f"{what}: a second launch differs by {(got - again).abs().max():.3g}"


def test_mlp_matches_the_torch_backend():
    """TorchBackend.mlp (the reference backend's two linears) and the fused kernel agree, bf16 weights."""
    o = operands(2, 48, 200, torch.bfloat16, seed=3)
    tb = TorchBackend(DEV)
    fc, proj = Linear(o["w1"], o["b1"]), Linear(o["w2"], o["b2"])
    want = tb.mlp(o["x"].clone(), *o["norm"], fc, proj, "gelu_tanh")
    got, _ = run(o)
    assert_close(got, want, *tolerance(torch.bfloat16), "fused mlp vs TorchBackend.mlp")


@pytest.mark.skipif(ON_GPU, reason="a GPU runs its own settings in every test")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=["fp32", "bf16", "int8"])
def test_mlp_with_the_gpu_settings(monkeypatch, dtype):
    """The block shape a GPU takes without autotuning (slices of 64 hidden units, groups of 8, 1,024-column
    reduction tiles, 8 warps) under the interpreter: 1,100 hidden units are 18 slices in 3 groups, the last
    slice and group short."""
    monkeypatch.setattr(mlp, "mlp_settings", functools.partial(utils.mlp_settings, interpreter=False))
    o = operands(2, 50, 1100, dtype, seed=5)
    got, want = run(o)
    assert_close(got, want, *tolerance(dtype), f"mlp with the GPU settings {dtype}")


def test_every_autotune_candidate():
    """Each block shape the autotuner may pick, launched directly: all give the reference's result (bf16 with
    GPT-2's flags, int8 with ReLU). On a GPU the candidates kept for a GPT-2-like shape (the prefetching ones on
    Hopper); under the interpreter every candidate but those (the same shapes, the prefetch being a no-op here),
    with C = 260 (only the 1,024-wide K blocks are pruned as wider than the row; the 512-wide ones run the same
    code in one masked step) and H = 520: several groups at every
    slice width but 64 in groups of 16, and a short last slice at every width (520 = 8 mod 16)."""
    M, C, H = (2, 768, 3072) if ON_GPU else (1, 260, 520)
    for dtype, act in ((torch.bfloat16, "gelu_tanh"), (torch.int8, "relu")):
        o = operands(M, C, H, dtype, seed=9)
        want = mlp.reference(o["x"], o["w1"], o["b1"], o["w2"], o["b2"], act, o["scale1"], o["scale2"], o["norm"])
        configs = mlp._candidates(mlp._mlp_tuned.configs, dict(w1_ptr=o["w1"], w2_ptr=o["w2"], C=C, H=H))
        if ON_GPU and torch.cuda.get_device_capability()[0] >= 9 and dtype == torch.bfloat16:
            assert any(c.kwargs["PREFETCH"] for c in configs), "no L2-prefetching candidate kept on Hopper"
        part_rows, count_stride = mlp._layout(C, H, DEV)
        counters = utils.new_counters(DEV)
        for c in configs:
            x = o["x"].clone()
            part = torch.empty(M, part_rows, C, device=DEV)
            g, beta, eps = o["norm"]
            mlp._mlp_kernel[(triton.cdiv(H, c.kwargs["BLOCK_H"]), M)](
                x, o["w1"], o["w1"] if o["scale1"] is None else o["scale1"], o["b1"], o["w2"],
                o["w2"] if o["scale2"] is None else o["scale2"], o["b2"], g, beta, part, counters, C, H, C, part_rows,
                count_stride, eps, SCALED=o["scale1"] is not None, HAS_BIAS1=True, HAS_BIAS2=True,
                GELU=act == "gelu_tanh", RELU=act == "relu", NORM=True, NORM_BLOCK=linear._norm_block((g,), C, 1),
                PDL=False, **c.kwargs, num_warps=c.num_warps)
            assert_close(x, want, *tolerance(dtype), f"mlp candidate {c.kwargs} warps {c.num_warps} {dtype}")
            assert not counters.any(), f"candidate {c.kwargs}: counters left non-zero"


def test_mlp_leading_dims_and_empty():
    """x (B, T, C) is updated through its (B*T, C) view; no rows is a no-op."""
    o = operands(6, 20, 90, torch.float32, seed=11)
    x = o["x"].clone().view(2, 3, 20)
    assert mlp.mlp(x, o["w1"], o["b1"], o["w2"], o["b2"], norm=o["norm"]) is x
    want = mlp.reference(o["x"], o["w1"], o["b1"], o["w2"], o["b2"], norm=o["norm"])
    assert_close(x.view(6, 20), want, *LINEAR_TOL, "mlp (2, 3, C)")
    empty = torch.empty(0, 20, device=DEV)
    assert mlp.mlp(empty, o["w1"], o["b1"], o["w2"], o["b2"]) is empty


def _bad_calls():
    o = operands(2, 8, 24, torch.float32, seed=13)
    x, w1, b1, w2, b2 = (o[k] for k in ("x", "w1", "b1", "w2", "b2"))
    return [
        ("proj shape", lambda: mlp.mlp(x, w1, b1, w2[:, :20].contiguous(), b2), r"expected \(8, 24\)"),
        ("mixed dtypes", lambda: mlp.mlp(x, w1, b1, w2.bfloat16(), b2), "proj weight must be one of"),
        ("in-features", lambda: mlp.mlp(x[:, :7].contiguous(), w1, b1, w2, b2), "in-features 8"),
        ("fc bias", lambda: mlp.mlp(x, w1, b2, w2, b2), r"fc bias must be a contiguous \(24,\)"),
        ("act", lambda: mlp.mlp(x, w1, b1, w2, b2, "gelu"), "act must be one of"),
        ("int8 without scales", lambda: mlp.mlp(x, w1.to(torch.int8), b1, w2.to(torch.int8), b2),
         "scale is required for int8"),
        ("int4", lambda: mlp.mlp(x, w1.to(torch.uint8), b1, w2.to(torch.uint8), b2), "fc weight must be one of"),
        ("norm", lambda: mlp.mlp(x, w1, b1, w2, b2, norm=o["norm"][:2]), "norm must be a"),
        ("x not a view of rows", lambda: mlp.mlp(torch.randn(2, 4, 8, device=DEV)[:, :3], w1, b1, w2, b2),
         r"must be viewable as \(rows, 8\)"),
        ("counters dtype", lambda: mlp.mlp(x, w1, b1, w2, b2, counters=torch.zeros(64, device=DEV)),
         "counters must be one of"),
        ("counters size", lambda: mlp.mlp(x, w1, b1, w2, b2, counters=torch.zeros(1, dtype=torch.int32, device=DEV)),
         "counters must be a contiguous int32 buffer of at least"),
    ]


@pytest.mark.parametrize("name,call,message", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_raise_value_error(name, call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- the triton backend's choice ----------------------------------------------------------------------------------
def recording_backend(monkeypatch, *targets) -> tuple:
    """(a TritonBackend, calls): each call of a target (object, attribute, label) appends its label to calls (a
    label may be a function of the call's keyword arguments)."""
    calls = []
    for obj, name, label in targets:
        fn = getattr(obj, name)

        def recorded(*args, _fn=fn, _label=label, **kwargs):
            calls.append(_label(kwargs) if callable(_label) else _label)
            return _fn(*args, **kwargs)
        monkeypatch.setattr(obj, name, recorded)
    return triton_backend.TritonBackend(DEV), calls


@pytest.fixture
def backend_calls(monkeypatch):
    """A TritonBackend whose fused and composed MLP record which ran."""
    return recording_backend(monkeypatch, (mlp, "mlp", "fused"), (TorchBackend, "mlp", "composed"))


@pytest.mark.parametrize("rows,dtype,fused", [(1, torch.bfloat16, True), (8, torch.int8, True),
                                              (9, torch.bfloat16, False), (1, "int4", False)])
def test_backend_fuses_decode_rows(backend_calls, rows, dtype, fused):
    """Up to FUSED_MAX_ROWS rows of float or int8 weights take the fused kernel (on a GPU, where it is the
    faster: timed here it may not be, so only the interpreter asserts the choice), more rows and int4 weights the
    two linears; the result is the reference's either way."""
    be, calls = backend_calls
    o = operands(rows, 40, 160, torch.float32 if dtype == "int4" else dtype, seed=17)
    if dtype == "int4":
        from aigc_rt.format import dequantize_int4, quantize_int4
        (q1, s1), (q2, s2) = quantize_int4(o["w1"]), quantize_int4(o["w2"])
        fc, proj = be.prepare_linear(q1, o["b1"], s1), be.prepare_linear(q2, o["b2"], s2)
        want = mlp.reference(o["x"], dequantize_int4(q1, s1), o["b1"], dequantize_int4(q2, s2), o["b2"],
                             norm=o["norm"])
        tol = tolerance(torch.float32)  # the int4 GEMV: fp32 activations times the levels and scales
    else:
        fc = be.prepare_linear(o["w1"], o["b1"], o["scale1"])
        proj = be.prepare_linear(o["w2"], o["b2"], o["scale2"])
        want = mlp.reference(o["x"], o["w1"], o["b1"], o["w2"], o["b2"], "gelu_tanh", o["scale1"], o["scale2"],
                             o["norm"])
        tol = tolerance(dtype)
    x = o["x"].clone()
    assert be.mlp(x, *o["norm"], fc, proj, "gelu_tanh") is x
    assert_close(x, want, *tol, f"backend mlp rows={rows} {dtype}")
    if not ON_GPU:
        assert calls == ["fused" if fused else "composed"], calls


def test_backend_without_fusion(backend_calls, monkeypatch):
    """AIGC_RT_FUSED_MLP=0 (FUSED_MLP off): the two linears, at any row count."""
    be, calls = backend_calls
    monkeypatch.setattr(triton_backend, "FUSED_MLP", False)
    o = operands(1, 40, 160, torch.bfloat16, seed=19)
    fc, proj = be.prepare_linear(o["w1"], o["b1"]), be.prepare_linear(o["w2"], o["b2"])
    be.mlp(o["x"].clone(), *o["norm"], fc, proj)
    assert calls == ["composed"]


@pytest.fixture
def checked(monkeypatch):
    """The check of a fused sub-layer's first launch (triton_backend._fused_agrees) run here too, from scratch."""
    monkeypatch.setattr(triton_backend, "CHECK_FUSED_ON_CPU", True)
    monkeypatch.setattr(triton_backend, "_checked", {})
    monkeypatch.setattr(linear, "AUTOTUNE", False)  # nothing timed: a GPU's pick is linear._faster's test


def broken_mlp(fault: str):
    """mlp.mlp with a fault a race in its counters could cause: "wrong" (a partial sum lost: an output off by 1)
    or "unrepeatable" (an output a few ulps off, differently at each launch)."""
    launches, real = [], mlp.mlp

    def launch(x, *args, **kwargs):
        real(x, *args, **kwargs)
        launches.append(x)
        x[0, 0] += 1.0 if fault == "wrong" else 1e-6 * len(launches)
        return x
    return launch


@pytest.mark.parametrize("fault", [None, "wrong", "unrepeatable"])
def test_fused_kernel_checked_on_its_first_launch(checked, monkeypatch, fault):
    """On a GPU a fused sub-layer's first launch of a shape runs it composed, fused and fused again from the same
    input, and keeps the fusion only if it agrees with the composed result and with itself: a wrong or unrepeatable
    fused kernel warns, and the shape runs composed from then on, with the right result."""
    if fault is not None:
        monkeypatch.setattr(mlp, "mlp", broken_mlp(fault))
    be, calls = recording_backend(monkeypatch, (mlp, "mlp", "fused"), (TorchBackend, "mlp", "composed"))
    o = operands(2, 40, 160, torch.bfloat16, seed=23)
    fc, proj = be.prepare_linear(o["w1"], o["b1"]), be.prepare_linear(o["w2"], o["b2"])
    want = mlp.reference(o["x"], o["w1"], o["b1"], o["w2"], o["b2"], norm=o["norm"])
    for launch in range(2):
        x = o["x"].clone()
        if fault is not None and launch == 0:
            more = "not the same bits" if fault == "unrepeatable" else "max .difference. 1,"
            with pytest.warns(RuntimeWarning, match=f"fused mlp kernel disagrees.*{more}"):
                be.mlp(x, *o["norm"], fc, proj)
        else:
            be.mlp(x, *o["norm"], fc, proj)
        assert_close(x, want, *tolerance(torch.bfloat16), f"checked mlp, launch {launch}, fault {fault}")
        picked = "fused" if fault is None else "composed"
        assert calls == (["composed", "fused", "fused", picked] if launch == 0 else [picked]), (launch, calls)
        calls.clear()
    assert list(triton_backend._checked.values()) == [("fused",) if fault is None else ()]


def test_fused_check_waits_for_finite_input(checked, monkeypatch):
    """A first launch whose composed result is not finite (NaN in the residual stream) cannot judge the fusion: no
    warning, the launch runs composed, nothing is remembered, and the next launch checks again."""
    import warnings
    be, calls = recording_backend(monkeypatch, (mlp, "mlp", "fused"), (TorchBackend, "mlp", "composed"))
    o = operands(1, 40, 160, torch.bfloat16, seed=29)
    fc, proj = be.prepare_linear(o["w1"], o["b1"]), be.prepare_linear(o["w2"], o["b2"])
    x = o["x"].clone()
    x[0, 3] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        be.mlp(x, *o["norm"], fc, proj)
    assert not [w for w in caught if "aigc_rt" in str(w.message)], [str(w.message) for w in caught]
    assert calls == ["composed", "composed"] and triton_backend._checked == {}, calls  # the fused shapes not run
    calls.clear()
    be.mlp(o["x"].clone(), *o["norm"], fc, proj)
    assert calls == ["composed", "fused", "fused", "fused"] and list(triton_backend._checked.values()) == [("fused",)]


# -- the decode attention with its output projection -------------------------------------------------------------
def attention_operands(B: int, H: int, D: int, S: int, N: int, dtype, cache_dtype=torch.float32, seed: int = 0):
    """q (B, H, D); caches (B, H, S, D); ragged lengths in [0, S - 1] (row 0 empty where B > 2); this step's k, v
    and positions (each row's length); W (N, H * D) of `dtype` (int8 with scales), bias (N,), a residual (B, N)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S, (B,), generator=g)
    if B > 2:
        lengths[0] = 0
    if dtype == torch.int8:
        w, scale = int8_weights(N, H * D, (seed + 1, seed + 2))
    else:
        w, scale = randn(N, H * D, seed=seed + 1, scale=(H * D) ** -0.5, dtype=dtype), None
    return dict(q=randn(B, H, D, seed=seed + 3), kc=randn(B, H, S, D, seed=seed + 4).to(cache_dtype),
                vc=randn(B, H, S, D, seed=seed + 5).to(cache_dtype), k=randn(B, H, D, seed=seed + 6),
                v=randn(B, H, D, seed=seed + 7), lengths=lengths.to(DEV), w=w, scale=scale, b=randn(N, seed=seed + 8),
                r=randn(B, N, seed=seed + 9))


def attention_reference(o: dict, append: bool) -> torch.Tensor:
    """r + proj(attention) in fp32: the step's k, v written at position lengths - 1 first when appending (as
    write_kv rounds them), then decode_attention.reference and linear.reference."""
    kc, vc = o["kc"].clone(), o["vc"].clone()
    if append:
        for b, n in enumerate(o["lengths"].tolist()):
            if n > 0:
                kc[b, :, n - 1], vc[b, :, n - 1] = o["k"][b].to(kc.dtype), o["v"][b].to(vc.dtype)
    a = decode_attention.reference(o["q"], kc, vc, o["lengths"]).reshape(o["q"].shape[0], -1)
    return linear.reference(a, o["w"], o["b"], scale=o["scale"], residual=o["r"])


def run_attention(o: dict, append: bool, counters=None) -> torch.Tensor:
    """Ours on copies of the caches and the residual: (residual, k cache, v cache)."""
    kc, vc, r = o["kc"].clone(), o["vc"].clone(), o["r"].clone()
    kw = dict(new_kv=(o["k"], o["v"]), positions=(o["lengths"] - 1).clamp(min=0)) if append else {}
    got = decode_attention.attention_decode(o["q"], kc, vc, o["lengths"], kc.shape[2],
                                            proj=(o["w"], o["b"], o["scale"]), residual=r, counters=counters, **kw)
    assert got is r
    return r, kc, vc


ATTN_TOL = {torch.bfloat16: (5e-3, 5e-3), torch.float16: (1e-3, 1e-3)}  # the output rounded to W's dtype


@pytest.mark.parametrize("B,H,D,S,N", shapes([(1, 3, 32, 20, 96), (3, 5, 16, 130, 70), (1, 2, 24, 40, 50)],
                                             [(1, 12, 64, 160, 768), (8, 25, 64, 1024, 1600)]))
@pytest.mark.parametrize("dtype", [*DTYPES, torch.int8], ids=["fp32", "bf16", "fp16", "int8"])
def test_attention_with_projection(B, H, D, S, N, dtype):
    """residual += proj(attention): one pass (short caches) and split + merge (longer ones: the merge projects),
    W's outputs in slices where a row has few heads (here 3 of 32 and 4 of 16, the last one past N), ragged
    lengths (an empty row gets the bias), with and without this step's k, v appended (the cache then holds them,
    as write_kv would); bf16 caches too; the counters are zeros again; a second launch gives the same bits."""
    counters = utils.new_counters(DEV)
    for append, cache_dtype in ((False, torch.float32), (True, torch.bfloat16)):
        o = attention_operands(B, H, D, S, N, dtype, cache_dtype, seed=B + H + S)
        what = f"attention + proj B={B} H={H} D={D} S={S} N={N} {dtype} append={append} cache {cache_dtype}"
        want = attention_reference(o, append)
        got, kc, vc = run_attention(o, append, counters)
        assert_close(got, want, *ATTN_TOL.get(dtype, LINEAR_TOL), what)
        assert not counters.any(), f"{what}: counters left {counters.nonzero().flatten().tolist()}"
        again, _, _ = run_attention(o, append, counters)
        assert torch.equal(got, again), f"{what}: a second launch differs by {(got - again).abs().max():.3g}"
        if append:
            for b, n in enumerate(o["lengths"].tolist()):
                if n > 0:
                    assert torch.equal(kc[b, :, n - 1], o["k"][b].to(kc.dtype)), f"{what}: k not appended"
                    assert torch.equal(vc[b, :, n - 1], o["v"][b].to(vc.dtype)), f"{what}: v not appended"


@pytest.mark.skipif(ON_GPU, reason="a GPU runs its own settings in every test")
@pytest.mark.parametrize("S", [160, 1024])
def test_attention_with_projection_and_the_gpu_settings(gpu_settings, S):
    """A GPU's block shapes under the interpreter (64-position blocks, 128-output tiles of W, partials added 8
    at a time in 1,024-column tiles): 25 heads (GPT-2 1.5B's) are 4 groups, the last one short; one pass over 160
    positions, split + merge over 1,024."""
    o = attention_operands(2, 25, 16, S, 80, torch.bfloat16, seed=S)
    got, _, _ = run_attention(o, True)
    assert_close(got, attention_reference(o, True), *ATTN_TOL[torch.bfloat16], f"GPU settings S={S}")


def _bad_attention_calls():
    o = attention_operands(2, 3, 8, 10, 12, torch.float32, seed=21)
    q, kc, vc, lengths, w, b, r = (o[k] for k in ("q", "kc", "vc", "lengths", "w", "b", "r"))

    def call(**kw):
        return lambda: decode_attention.attention_decode(q, kc, vc, lengths, 10, **kw)
    return [
        ("proj in-features", call(proj=(w[:, :20].contiguous(), b, None), residual=r), r"contiguous \(out, 24\)"),
        ("proj tuple", call(proj=(w, b), residual=r), "proj must be a"),
        ("proj int8 without scale", call(proj=(w.to(torch.int8), b, None), residual=r), "scale is required for int8"),
        ("proj bias", call(proj=(w, b[:5], None), residual=r), r"proj bias must be a contiguous \(12,\)"),
        ("proj without residual", call(proj=(w, b, None)), "proj needs residual"),
        ("proj residual shape", call(proj=(w, b, None), residual=r[:, :5].contiguous()),
         r"residual must be a contiguous \(2, 12\)"),
        ("proj with out", call(proj=(w, b, None), residual=r, out=torch.empty(2, 3, 8, device=DEV)),
         "out must be None"),
        ("residual without proj", call(residual=r), "residual and counters go with proj"),
        ("counters size", call(proj=(w, b, None), residual=r, counters=torch.zeros(2, dtype=torch.int32, device=DEV)),
         "counters must be a contiguous int32 buffer of at least"),
    ]


@pytest.mark.parametrize("name,call,message", _bad_attention_calls(), ids=[c[0] for c in _bad_attention_calls()])
def test_attention_projection_bad_inputs(name, call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.fixture
def attention_calls(monkeypatch):
    """A TritonBackend whose fused and composed attention sub-layers record which ran."""
    return recording_backend(
        monkeypatch, (decode_attention, "attention_decode", lambda kw: "fused" if "proj" in kw else "attention"),
        (TorchBackend, "append_attention_decode_proj", "composed"))


@pytest.mark.parametrize("rows,dtype,fused", [(1, torch.bfloat16, True), (8, torch.int8, True),
                                              (9, torch.bfloat16, False), (2, "int4", False)])
def test_backend_fuses_decode_attention_and_projection(attention_calls, rows, dtype, fused):
    """append_attention_decode_proj on the triton backend: up to FUSED_MAX_ROWS rows of float or int8 W in one
    kernel (on a GPU where it is the faster: only the interpreter asserts the choice), more rows and int4 W as the
    attention and the linear apart; the reference's result and the appended cache either way."""
    be, calls = attention_calls
    o = attention_operands(rows, 3, 16, 40, 48, torch.float32 if dtype == "int4" else dtype, seed=rows)
    if dtype == "int4":
        from aigc_rt.format import dequantize_int4, quantize_int4
        q4, s4 = quantize_int4(o["w"])
        proj = be.prepare_linear(q4, o["b"], s4)
        o["w"] = dequantize_int4(q4, s4)
    else:
        proj = be.prepare_linear(o["w"], o["b"], o["scale"])
    want = attention_reference(o, True)
    kc, vc, r = o["kc"].clone(), o["vc"].clone(), o["r"].clone()
    B, H, D = o["q"].shape
    attn_out, out = torch.empty(B, H, D, device=DEV), torch.empty(B, o["w"].shape[0], device=DEV)
    got = be.append_attention_decode_proj(o["q"], o["k"], o["v"], kc, vc, (o["lengths"] - 1).clamp(min=0),
                                          o["lengths"], 40, proj, residual=r, attn_out=attn_out, out=out)
    assert got is r
    assert_close(r, want, *ATTN_TOL.get(dtype, LINEAR_TOL), f"backend attention + proj rows={rows} {dtype}")
    if not ON_GPU:
        assert calls == (["fused"] if fused else ["composed", "attention"]), calls


def test_backend_without_attention_fusion(attention_calls, monkeypatch):
    """AIGC_RT_FUSED_ATTN_PROJ=0 (FUSED_ATTN_PROJ off): the attention and the linear apart."""
    be, calls = attention_calls
    monkeypatch.setattr(triton_backend, "FUSED_ATTN_PROJ", False)
    o = attention_operands(1, 3, 16, 20, 48, torch.bfloat16, seed=5)
    proj = be.prepare_linear(o["w"], o["b"])
    be.append_attention_decode_proj(o["q"], o["k"], o["v"], o["kc"].clone(), o["vc"].clone(), o["lengths"] - 1,
                                    o["lengths"], 20, proj, residual=o["r"].clone(),
                                    attn_out=torch.empty(1, 3, 16, device=DEV), out=torch.empty(1, 48, device=DEV))
    assert calls == ["composed", "attention"]


# -- the whole attention sub-layer: LN1 + qkv + attention + proj + residual (decode_attention.attention_block) ----
def block_operands(B: int, H: int, D: int, S: int, dtype, cache_dtype, seed: int = 0) -> dict:
    """A residual stream r (B, C), C = H * D; LN1; W_qkv (3C, C) and W_o (C, C) of `dtype` (int8 with scales)
    and biases; caches (B, H, S, D); ragged lengths in [1, S] counting this step's position (lengths - 1)."""
    C = H * D
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S + 1, (B,), generator=g).to(DEV)
    if dtype == torch.int8:
        (wq, sq), (wo, so) = int8_weights(3 * C, C, (seed + 1, seed + 2)), int8_weights(C, C, (seed + 3, seed + 4))
    else:
        wq, sq = randn(3 * C, C, seed=seed + 1, scale=C ** -0.5, dtype=dtype), None
        wo, so = randn(C, C, seed=seed + 3, scale=C ** -0.5, dtype=dtype), None
    return dict(r=randn(B, C, seed=seed + 5, scale=3) + 1, norm=(randn(C, seed=seed + 6, scale=0.2) + 1,
                                                                 randn(C, seed=seed + 7, scale=0.2), 1e-5),
                qkv=(wq, randn(3 * C, seed=seed + 8), sq), proj=(wo, randn(C, seed=seed + 9), so),
                kc=randn(B, H, S, D, seed=seed + 10).to(cache_dtype),
                vc=randn(B, H, S, D, seed=seed + 11).to(cache_dtype),
                lengths=lengths, positions=lengths - 1)


def block_reference(o: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r + proj(attention(qkv(LN(r)))), the caches with this step's k, v written) in fp32 references."""
    B, H, S, D = o["kc"].shape
    wq, bq, sq = o["qkv"]
    q, k, v = linear.reference(o["r"], wq, bq, scale=sq, norm=o["norm"]).view(B, 3, H, D).unbind(1)
    kc, vc = o["kc"].clone(), o["vc"].clone()
    for b, p in enumerate(o["positions"].tolist()):
        kc[b, :, p], vc[b, :, p] = k[b].to(kc.dtype), v[b].to(vc.dtype)
    a = decode_attention.reference(q, kc, vc, o["lengths"]).reshape(B, H * D)
    wo, bo, so = o["proj"]
    return linear.reference(a, wo, bo, scale=so, residual=o["r"]), kc, vc


def run_block(o: dict, counters=None, shape: str = "fused") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, kc, vc = o["r"].clone(), o["kc"].clone(), o["vc"].clone()
    got = decode_attention.attention_block(r, o["norm"], o["qkv"], o["proj"], kc, vc, o["positions"], o["lengths"],
                                           counters=counters, shape=shape)
    assert got is r
    return r, kc, vc


@pytest.mark.parametrize("B,H,D,S", shapes([(1, 3, 32, 20), (3, 2, 24, 32), (2, 5, 16, 9)],
                                           [(1, 12, 64, 192), (8, 25, 64, 256)]))
@pytest.mark.parametrize("dtype", [*DTYPES, torch.int8], ids=["fp32", "bf16", "fp16", "int8"])
def test_attention_block(B, H, D, S, dtype):
    """r += proj(attention(qkv(LN1(r)))) with this step's k, v appended, in one launch, against the references
    (a bf16 cache with 16-bit weights, fp32 with fp32 and int8 ones; where a row has few heads, the projection in
    slices and the row's last slice adding into r); the caches hold the step's k, v; counters back at zero; a
    second launch gives the same bits."""
    counters = utils.new_counters(DEV)
    for cache_dtype in [torch.bfloat16 if dtype in (torch.bfloat16, torch.float16) else torch.float32]:
        o = block_operands(B, H, D, S, dtype, cache_dtype, seed=B + H + S)
        what = f"attention block B={B} H={H} D={D} S={S} {dtype} cache {cache_dtype}"
        want, kc_want, vc_want = block_reference(o)
        got, kc, vc = run_block(o, counters)
        assert_close(got, want, *tolerance(dtype), what)
        tol = (1e-5, 1e-5) if cache_dtype == torch.float32 else (1e-2, 1e-2)  # one bf16 rounding step apart at most
        assert_close(kc, kc_want, *tol, f"{what}: k cache")
        assert_close(vc, vc_want, *tol, f"{what}: v cache")
        assert not counters.any(), f"{what}: counters left {counters.nonzero().flatten().tolist()}"
        again, _, _ = run_block(o, counters)
        assert torch.equal(got, again), f"{what}: a second launch differs by {(got - again).abs().max():.3g}"


@pytest.mark.parametrize("B,H,D,S", shapes([(1, 3, 32, 20), (3, 2, 24, 32), (2, 5, 16, 9)],
                                           [(1, 12, 64, 192), (8, 25, 64, 256)]))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8], ids=["bf16", "fp32", "int8"])
@pytest.mark.parametrize("shape", ["wide", "spread"])
def test_attention_block_shapes(B, H, D, S, dtype, shape):
    """The fused sub-layer's other launch shapes (a GPU times them against the default one) against the references:
    wide (the qkv GEMV in steps of four times the inputs) and spread (a head's q, k, v rows over several programs,
    here 2-3 a head of which the last partly past the head's rows, or all in one; the head's last program attending
    and projecting); the caches hold the step's k, v; counters back at zero; a second launch gives the same bits."""
    counters = utils.new_counters(DEV)
    cache_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    o = block_operands(B, H, D, S, dtype, cache_dtype, seed=B + S)
    want, kc_want, vc_want = block_reference(o)
    got, kc, vc = run_block(o, counters, shape=shape)
    what = f"{shape} attention block B={B} H={H} D={D} S={S} {dtype}"
    assert_close(got, want, *tolerance(dtype), what)
    tol = (1e-5, 1e-5) if cache_dtype == torch.float32 else (1e-2, 1e-2)
    assert_close(kc, kc_want, *tol, f"{what}: k cache")
    assert_close(vc, vc_want, *tol, f"{what}: v cache")
    assert not counters.any(), f"{what}: counters left {counters.nonzero().flatten().tolist()}"
    again, _, _ = run_block(o, counters, shape=shape)
    assert torch.equal(got, again), f"{what}: a second launch differs by {(got - again).abs().max():.3g}"


def test_attention_block_spread_writes_qkv_out():
    """The spread shape's q, k, v go through the caller's scratch (the decode Workspace's qkv buffer), which then
    holds LayerNorm(r) W_qkv^T + b; a scratch of the wrong shape is refused by name."""
    o = block_operands(2, 3, 16, 20, torch.float32, torch.float32, seed=41)
    scratch = torch.full((2, 144), float("nan"), device=DEV)
    r = o["r"].clone()
    decode_attention.attention_block(r, o["norm"], o["qkv"], o["proj"], o["kc"].clone(), o["vc"].clone(),
                                     o["positions"], o["lengths"], shape="spread", qkv_out=scratch)
    wq, bq, _ = o["qkv"]
    assert_close(scratch, linear.reference(o["r"], wq, bq, norm=o["norm"]), 1e-5, 1e-5, "qkv_out")
    with pytest.raises(ValueError, match=r"qkv_out must be a contiguous \(2, 144\) tensor"):
        decode_attention.attention_block(r, o["norm"], o["qkv"], o["proj"], o["kc"], o["vc"], o["positions"],
                                         o["lengths"], shape="spread", qkv_out=scratch[:, :100])
    with pytest.raises(ValueError, match="shape must be one of"):
        run_block(o, shape="narrow")


@pytest.mark.skipif(ON_GPU, reason="a GPU runs its own settings in every test")
@pytest.mark.parametrize("B,H,S,shape", [(2, 25, 160, "fused"), (1, 3, 100, "fused"), (2, 25, 160, "wide"),
                                         (2, 25, 160, "spread"), (1, 3, 100, "spread")])
def test_attention_block_with_the_gpu_settings(gpu_settings, B, H, S, shape):
    """A GPU's block shapes under the interpreter (one pass over up to 256 positions in blocks of 64, the qkv GEMV
    in steps of 4,096 / BLOCK_D inputs (wide: 16,384; spread: 8,192 / its rows), projection tiles of 8,192 weights,
    partials 8 at a time): 25 heads in 4 groups, and 3 heads with the projection in 3 slices (the row's last slice
    adding into r) or, spread, a head's 48 q, k, v rows over 3 programs of 16 (1 row, 3 heads, 132 SMs)."""
    o = block_operands(B, H, 16, S, torch.bfloat16, torch.bfloat16, seed=S)
    got, kc, _ = run_block(o, shape=shape)
    want, kc_want, _ = block_reference(o)
    assert_close(got, want, *tolerance(torch.bfloat16), f"attention block with the GPU settings B={B} H={H} S={S}")
    assert_close(kc, kc_want, 1e-2, 1e-2, "k cache")


def test_attention_block_refuses():
    o = block_operands(2, 3, 8, 20, torch.float32, torch.float32, seed=31)
    long = dict(o, kc=torch.zeros(2, 3, 400, 8, device=DEV), vc=torch.zeros(2, 3, 400, 8, device=DEV))
    with pytest.raises(ValueError, match="one pass"):
        run_block(long)
    with pytest.raises(ValueError, match=r"qkv weight must be a contiguous \(72, 24\)"):
        run_block(dict(o, qkv=(o["qkv"][0][:70], None, None)))
    with pytest.raises(ValueError, match="must have one dtype"):
        run_block(dict(o, proj=(o["proj"][0].bfloat16(), None, None)))
    with pytest.raises(ValueError, match="do not match a residual of width"):
        run_block(dict(o, r=o["r"][:, :20].contiguous()))


@pytest.fixture
def block_calls(monkeypatch):
    """A TritonBackend whose whole-block kernel and composed attention sub-layer record which ran."""
    return recording_backend(monkeypatch, (decode_attention, "attention_block", "fused"),
                             (TorchBackend, "attention_block_decode", "composed"))


@pytest.mark.parametrize("rows,S,fused", [(1, 20, True), (8, 32, True), (9, 20, False), (2, 64, False)])
def test_backend_fuses_the_attention_block(block_calls, rows, S, fused):
    """attention_block_decode on the triton backend: up to FUSED_MAX_ROWS rows over a cache read in one pass take
    the one kernel (on a GPU where it is the faster: only the interpreter asserts the choice), more rows or a longer
    cache the qkv linear and the attention sub-layer apart; the reference's result either way."""
    be, calls = block_calls
    o = block_operands(rows, 3, 16, S, torch.bfloat16, torch.bfloat16, seed=rows + S)
    (wq, bq, _), (wo, bo, _) = o["qkv"], o["proj"]
    qkv, proj = be.prepare_linear(wq, bq), be.prepare_linear(wo, bo)
    want, _, _ = block_reference(o)
    r, kc, vc = o["r"].clone(), o["kc"].clone(), o["vc"].clone()
    C = r.shape[1]
    scratch = dict(norm_out=torch.empty(rows, C, device=DEV), qkv_out=torch.empty(rows, 3 * C, device=DEV),
                   attn_out=torch.empty(rows, 3, 16, device=DEV), out=torch.empty(rows, C, device=DEV))
    assert be.attention_block_decode(r, *o["norm"], qkv, proj, kc, vc, o["positions"], o["lengths"], S,
                                     **scratch) is r
    assert_close(r, want, *tolerance(torch.bfloat16), f"backend attention block rows={rows} S={S}")
    if not ON_GPU:
        assert calls == (["fused"] if fused else ["composed"]), calls


def test_fused_check_drops_a_wrong_launch_shape(checked, monkeypatch):
    """The first-launch check runs each of the attention block's launch shapes twice: one that is wrong (here spread,
    an output off by 1) warns by name and is dropped, the others stay; the launch after runs the first that passed,
    with the reference's result."""
    real = decode_attention.attention_block

    def broken(r, *args, shape="fused", **kwargs):
        real(r, *args, shape=shape, **kwargs)
        if shape == "spread":
            r[0, 0] += 1.0
        return r
    monkeypatch.setattr(decode_attention, "attention_block", broken)
    be, calls = recording_backend(monkeypatch, (decode_attention, "attention_block", lambda kw: kw["shape"]),
                                  (TorchBackend, "attention_block_decode", "composed"))
    o = block_operands(1, 3, 16, 20, torch.bfloat16, torch.bfloat16, seed=43)
    (wq, bq, _), (wo, bo, _) = o["qkv"], o["proj"]
    qkv, proj = be.prepare_linear(wq, bq), be.prepare_linear(wo, bo)
    want, _, _ = block_reference(o)
    C = o["r"].shape[1]
    scratch = dict(norm_out=torch.empty(1, C, device=DEV), qkv_out=torch.empty(1, 3 * C, device=DEV),
                   attn_out=torch.empty(1, 3, 16, device=DEV), out=torch.empty(1, C, device=DEV))
    r = o["r"].clone()
    with pytest.warns(RuntimeWarning, match=r"fused attn_block kernel \(spread launch shape\) disagrees"):
        be.attention_block_decode(r, *o["norm"], qkv, proj, o["kc"].clone(), o["vc"].clone(), o["positions"],
                                  o["lengths"], 20, **scratch)
    assert calls == ["composed", "fused", "fused", "wide", "wide", "spread", "spread", "fused"], calls
    assert [ok for k, ok in triton_backend._checked.items() if k[0] == "attn_block"] == [("fused", "wide")]
    assert_close(r, want, *tolerance(torch.bfloat16), "checked attention block")


def test_pick_times_every_fused_shape(monkeypatch):
    """On a GPU a sub-layer with several fused launch shapes (the attention block's default and wide ones) times them
    all against the kernels apart, once its fused kernel has passed its check; without the check passed it runs
    apart, untimed. (Faked here: a tensor that says it is on a GPU, the check and the timer stubbed.)"""
    class OnGpu:
        is_cuda = True
    timed = []
    monkeypatch.setattr(linear, "AUTOTUNE", True)
    monkeypatch.setattr(linear, "_faster", lambda key, y, launch, choices: timed.append(choices) or choices[-1])
    monkeypatch.setattr(triton_backend, "_fused_agrees", lambda key, y, run, shapes: shapes)
    assert triton_backend._pick(True, OnGpu(), None, ("attn_block",), fused=("fused", "wide")) == "wide"
    assert timed == [("composed", "fused", "wide")]
    assert triton_backend._pick(True, OnGpu(), None, ("mlp",)) == "fused" and timed[-1] == ("composed", "fused")
    # only the shapes that passed their check are timed
    monkeypatch.setattr(triton_backend, "_fused_agrees", lambda key, y, run, shapes: shapes[1:])
    assert triton_backend._pick(True, OnGpu(), None, ("attn_block",), fused=("fused", "wide", "spread")) == "spread"
    assert timed[-1] == ("composed", "wide", "spread")
    monkeypatch.setattr(triton_backend, "_fused_agrees", lambda key, y, run, shapes: ())
    assert triton_backend._pick(True, OnGpu(), None, ("attn_block",), fused=("fused", "wide")) == "composed"
    assert len(timed) == 3


@pytest.mark.parametrize("check", [False, True], ids=["unchecked", "checked"])
def test_model_decode_runs_the_fused_blocks(rt_odd, monkeypatch, request, check):
    """The tiny GPT-2 on the triton backend, decoding over a cache short enough for one pass: every block's
    attention and MLP sub-layers run as one kernel each (counted; under the interpreter, where nothing is timed),
    and the logits are the torch backend's; also with the check a GPU runs on each fused shape's first launch
    (twice more fused, once composed: the KV cache written three more times, the logits the same)."""
    import aigc_rt
    if check:
        request.getfixturevalue("checked")
    calls = []
    for module, name in ((decode_attention, "attention_block"), (mlp, "mlp")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(*a, **k))
    ours, ref = (aigc_rt.load(rt_odd[0], device=DEV if be == "triton" else "cpu", backend=be)
                 for be in ("triton", "torch"))
    ids = torch.randint(0, ours.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    logits = []
    for m in (ours, ref):
        dev = m.device
        cache = m.new_cache(2, 32)
        with torch.inference_mode():
            m.prefill(ids.to(dev), cache)
            tokens, positions = torch.tensor([3, 4], device=dev), torch.tensor([5, 5], device=dev)
            logits.append([m.decode(tokens + i, positions + i, cache, 7 + i).float().cpu().clone() for i in range(2)])
    for step, (got, want) in enumerate(zip(*logits)):
        assert_close(got, want, 1e-4, 1e-4, f"decode step {step} logits vs the torch backend")
    if not ON_GPU:
        n = ours.config.n_layer
        more = 2 if check else 0  # one shape each, each launch shape checked twice
        assert calls.count("attention_block") == 2 * n + more * len(utils.BLOCK_SHAPES), calls
        assert calls.count("mlp") == 2 * n + more, calls
        shapes = {"attn_block": utils.BLOCK_SHAPES, "attn_proj": ("fused",), "mlp": ("fused",)}
        assert triton_backend._checked == ({k: shapes[k[0]] for k in triton_backend._checked} if check else {}), \
            triton_backend._checked
        # the attention block's composed run is the qkv linear and the attention with its projection: checked too
        assert sorted(k[0] for k in triton_backend._checked) == (["attn_block", "attn_proj", "mlp"] if check else [])
