"""C++ convolutions (csrc/cpu/conv.cpp): conv_transpose vs torch.nn.functional.conv_transpose2d (through the
plain-PyTorch reference of kernels/conv_transpose.py, which also handles paddings torch rejects) and conv2d vs
F.conv2d, fp32, on odd shapes (channels, kernel, stride, padding, output_padding), both micro-kernel ISAs, every
activation (torch's relu, tanh, leaky_relu, sigmoid)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aigc_rt import _C
from aigc_rt.kernels.conv_transpose import conv_transpose2d_reference as reference

ATOL, RTOL = 1e-4, 1e-5  # fp32
SLOPE = 0.2  # the DCGAN discriminator's LeakyReLU
TORCH_ACTS = {"none": lambda y: y, "relu": torch.relu, "tanh": torch.tanh,
              "leaky_relu": lambda y: F.leaky_relu(y, SLOPE), "sigmoid": torch.sigmoid}

# (N, C_in, C_out, H, W, k, stride, padding, output_padding)
SHAPES = [
    (1, 100, 256, 1, 1, 4, 1, 0, 0),  # DCGAN first layer: a 1x1 input is a GEMM
    (3, 100, 17, 1, 1, 4, 1, 0, 0),
    (2, 3, 20, 1, 1, 4, 2, 1, 1),  # 1x1 input with stride, padding and output padding
    (2, 256, 128, 4, 4, 4, 2, 1, 0),  # DCGAN middle layer
    (1, 111, 64, 5, 3, 4, 2, 1, 0),
    (3, 64, 3, 16, 16, 4, 2, 1, 0),  # DCGAN RGB layer: C_out < one vector takes the col2im path
    (2, 5, 3, 1, 1, 4, 2, 2, 1),  # col2im with a padding that crops past a 1-pixel input
    (2, 17, 33, 5, 7, 3, 2, 1, 1),
    (1, 5, 1, 3, 2, 5, 3, 2, 2),
    (2, 19, 40, 3, 4, 2, 3, 0, 1),  # stride > kernel: some outputs get no tap (bias only)
    (1, 7, 9, 6, 5, 1, 1, 0, 0),
    (2, 1, 16, 4, 3, 3, 1, 2, 0),  # padding that crops (torch itself rejects these)
    (1, 33, 50, 5, 6, 4, 1, 3, 0),
]

# conv2d: (N, C_in, C_out, H, W, k, stride, padding)
SHAPES_2D = [
    (2, 3, 64, 32, 32, 4, 2, 1),  # DCGAN discriminator: the RGB layer (im2col: 3 floats per tap)
    (3, 64, 128, 16, 16, 4, 2, 1),  # its middle layers
    (5, 256, 1, 4, 4, 4, 1, 0),  # its last layer: one output pixel and one channel
    (2, 17, 33, 7, 5, 3, 2, 1),
    (1, 5, 1, 6, 9, 5, 3, 2),
    (2, 1, 16, 4, 3, 3, 1, 2),  # padding wider than the image on both sides: edge outputs read zeros only
    (1, 7, 9, 6, 5, 1, 1, 0),
    (1, 33, 50, 5, 6, 4, 1, 3),
    (2, 19, 40, 9, 8, 2, 3, 0),  # stride > kernel: some inputs are never read
    (1, 3, 20, 16, 17, 16, 1, 0),  # the largest kernel
    (2, 12, 37, 7, 6, 3, 1, 1),  # im2col on AVX-512, by tap on AVX2
    (3, 4, 17, 3, 3, 3, 2, 0),  # a 1x1 output
]


TILE_ISAS = ("avx512_bf16", "avx512", "avx2")  # the conv tiles (avx512_bf16: native bf16 ones): no scalar ones
LANES = {"avx512_bf16": 16, "avx512": 16, "avx2": 8}


def tile_isa_missing(isa: str) -> str | None:
    """Why this CPU cannot run the `isa` tiles (the extension's own check: _C.set_simd_isa's CPU detection, and
    for avx512 also AVX-512 BW), or None if it can. Other errors propagate: a broken kernel must not skip."""
    try:
        _C.conv_transpose_prepare(torch.zeros(1, 1, 1, 1), torch.zeros(1), 1, 0, 0, isa)
    except ValueError as e:
        if "lacks" not in str(e):
            raise
        return str(e)
    return None


# the tests that use isa "auto" need some tiles; the ISA-parametrized ones skip per ISA (tile_isa)
pytestmark = pytest.mark.skipif(all(tile_isa_missing(isa) for isa in TILE_ISAS),
                                reason="this CPU has neither AVX2 + FMA nor AVX-512: no convolution tiles")


@pytest.fixture(params=TILE_ISAS)
def tile_isa(request):
    """One conv tile ISA per test, skipped (with the reason) where the CPU lacks it."""
    why = tile_isa_missing(request.param)
    if why:
        pytest.skip(f"this CPU lacks {request.param}: {why}")
    return request.param


def test_tile_isa_missing_reports_only_a_missing_isa(monkeypatch):
    """The skip check: the extension's "lacks" error skips; any other error still fails the test."""
    why = tile_isa_missing("avx2")
    assert why is None or "lacks AVX2" in why

    def lacks(*args):
        raise ValueError("conv_transpose: this CPU lacks AVX-512 (F, DQ, VL, BW)")
    monkeypatch.setattr(_C, "conv_transpose_prepare", lacks)
    assert "lacks AVX-512" in tile_isa_missing("avx512")

    def broken(*args):
        raise ValueError("conv_transpose: something else")
    monkeypatch.setattr(_C, "conv_transpose_prepare", broken)
    with pytest.raises(ValueError, match="something else"):
        tile_isa_missing("avx512")


def operands(w: torch.Tensor, x: torch.Tensor, dtype: str):
    """(the weight to prepare, the weight and input the fp32 reference multiplies): bf16 weights are given as
    bf16, and a bf16 layer rounds its input to bf16; the products of bf16 values are exact in fp32, so the
    tolerances stay fp32's."""
    if dtype == "fp32":
        return w, w, x
    return w.bfloat16(), w.bfloat16().float(), x.bfloat16().float()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_transpose_matches_torch(shape, tile_isa, dtype):
    isa = tile_isa
    n, cin, cout, h, w_, k, s, p, op = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, cin, h, w_, generator=g)
    w = torch.randn(cin, cout, k, k, generator=g) * 2 / (cin * k) ** 0.5  # pre-activations of a few units
    b = torch.randn(cout, generator=g)
    if p < k - 1:  # where torch can: the crop-based reference is F.conv_transpose2d itself
        want = F.conv_transpose2d(x, w, b, s, p, op)
        assert torch.allclose(reference(x, w, b, s, p, op, "none"), want, atol=1e-5)
    w_given, w_ref, x_ref = operands(w, x, dtype)
    weights = _C.conv_transpose_prepare(w_given, b, s, p, op, isa)
    assert weights.isa == isa and weights.col2im == (cout < LANES[isa]) and weights.bf16 == (dtype == "bf16")
    for act, torch_act in TORCH_ACTS.items():
        want = torch_act(reference(x_ref, w_ref, b, s, p, op, "none"))
        got = _C.conv_transpose(x, weights, act, SLOPE)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), \
            f"{act}: max abs err {(got - want).abs().max():.3g}"
        assert_rounded(_C.conv_transpose(x, weights, act, SLOPE, out_bf16=True), got)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES_2D, ids=lambda s: "x".join(map(str, s)))
def test_conv2d_matches_torch(shape, tile_isa, dtype):
    n, cin, cout, h, w_, k, s, p = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, cin, h, w_, generator=g)
    w = torch.randn(cout, cin, k, k, generator=g) * 2 / (cin * k * k) ** 0.5  # pre-activations of a few units
    b = torch.randn(cout, generator=g)
    w_given, w_ref, x_ref = operands(w, x, dtype)
    weights = _C.conv2d_prepare(w_given, b, s, p, tile_isa)
    assert weights.isa == tile_isa and not weights.transposed and not weights.col2im
    assert weights.im2col == (cin < LANES[tile_isa])  # few input channels: the inputs gathered, then one GEMM
    assert weights.bf16 == (dtype == "bf16")
    for act, torch_act in TORCH_ACTS.items():
        want = torch_act(F.conv2d(x_ref, w_ref, b, s, p))
        got = _C.conv2d(x, weights, act, SLOPE)
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), \
            f"{act}: max abs err {(got - want).abs().max():.3g}"
        assert_rounded(_C.conv2d(x, weights, act, SLOPE, out_bf16=True), got)


def assert_rounded(got: torch.Tensor, fp32: torch.Tensor):
    """out_bf16=True gives the fp32 output rounded by torch's .to(torch.bfloat16), bit for bit, in its layout."""
    assert got.dtype == torch.bfloat16 and got.shape == fp32.shape and got.stride() == fp32.stride()
    want = fp32.to(torch.bfloat16)
    diff = (got.view(torch.int16) != want.view(torch.int16)).sum().item()
    assert diff == 0, f"{diff} of {got.numel()} bf16 outputs differ from the rounded fp32 ones"


@pytest.mark.parametrize("op", ["conv2d", "conv_transpose"])
def test_bf16_outputs_round_special_values_as_torch(op, tile_isa):
    """Outputs rounded to bf16 in the tiles' vector store: ties to even, NaNs, +-inf, overflow to inf, denormals,
    the largest values, on full vectors and on a partial last one (C_out = 19: no multiple of 8 or 16). With a
    zero input every output is its channel's bias, so the bias carries the values."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0x7F7FFFFF, 0x7F7F7FFF, 0x00000001,
                         0x007FFFFF, 0x80800000, 0xFF800000, 0x7F800000, 0x7FC00001, 0xFFFFFFFF, 0xBF808001,
                         0x00000000, 0x80000001, 0x477FEFFF, 0x3EAAAAAB, 0xC2C7FFFF], dtype=torch.int64)
    bias = bits.to(torch.int32).view(torch.float32)  # (19,)
    c = bias.numel()
    x = torch.zeros(2, 5, 3, 3)
    if op == "conv2d":
        weights = _C.conv2d_prepare(torch.randn(c, 5, 3, 3), bias, 1, 1, tile_isa)
        got = _C.conv2d(x, weights, "none", out_bf16=True)
    else:
        weights = _C.conv_transpose_prepare(torch.randn(5, c, 3, 3), bias, 1, 1, 0, tile_isa)
        got = _C.conv_transpose(x, weights, "none", out_bf16=True)
    want = bias.to(torch.bfloat16).view(1, c, 1, 1).expand_as(got)
    # a NaN stays a NaN (torch makes each one 0xffff, we a quiet 0x7fc0); every other value bit for bit
    diff = (got.view(torch.int16) != want.view(torch.int16)) & ~(got.isnan() & want.isnan())
    assert not diff.any(), f"channels {diff.any(3).any(2).any(0).nonzero().flatten().tolist()} differ: " \
        f"{got[0, :, 0, 0].view(torch.int16).tolist()} vs {want[0, :, 0, 0].view(torch.int16).tolist()}"


@pytest.mark.parametrize("op", ["conv2d", "conv_transpose"])
def test_activations_over_their_whole_range(op, tile_isa):
    """Each activation alone (a 1x1 kernel of identity weights) on pre-activations from -100 to 100: sigmoid
    to a relative 1e-6 also where it is tiny (no cancellation, no overflow; below e^-87 ~ 1.6e-38, where torch
    returns denormals or 0, to an absolute 1e-37), tanh to 2e-7, leaky_relu exact for any slope (negative, above
    1)."""
    c = 24 * 7
    z = torch.linspace(-100, 100, c).view(1, c, 1, 1)
    z = torch.cat([z, z / 100, z / 1000])  # also the small pre-activations
    eye = torch.eye(c).view(c, c, 1, 1)
    prepare, run = ((_C.conv2d_prepare, _C.conv2d) if op == "conv2d" else
                    (lambda *a: _C.conv_transpose_prepare(*a[:4], 0, a[4]), _C.conv_transpose))
    weights = prepare(eye, torch.zeros(c), 1, 0, tile_isa)
    checks = [("sigmoid", None, torch.sigmoid(z), 1e-37, 1e-6), ("tanh", None, torch.tanh(z), 2e-7, 0),
              ("relu", None, torch.relu(z), 0, 0)]
    checks += [("leaky_relu", slope, F.leaky_relu(z, slope), 0, 0) for slope in (0.2, -0.5, 1.7, 0.0)]
    for act, slope, want, atol, rtol in checks:
        got = run(z, weights, act) if slope is None else run(z, weights, act, slope)
        assert torch.allclose(got, want, atol=atol, rtol=rtol), \
            f"{act} {slope}: max abs err {(got - want).abs().max():.3g}, rel {((got - want) / want).abs().max():.3g}"


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_col2im_bands(threads, tile_isa):
    """The col2im path (few output channels) works in bands of output rows, each multiplying the input rows it
    reads into per-thread scratch: bands split an image for more threads than images, or where an image's
    products exceed ~256 KiB (a 40x40 input); rows two bands read are multiplied by both. fp32 tolerances."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, size, (k, s, p, op) in ((1, 40, (4, 2, 1, 0)), (2, 7, (5, 3, 2, 1)), (1, 9, (3, 1, 1, 0)),
                                       (3, 40, (4, 2, 1, 0))):
            g = torch.Generator().manual_seed(n * size + threads)
            x = torch.randn(n, 8, size, size, generator=g)
            w, b = torch.randn(8, 3, k, k, generator=g) / 4, torch.randn(3, generator=g)
            weights = _C.conv_transpose_prepare(w, b, s, p, op, tile_isa)
            assert weights.col2im
            want = torch.tanh(reference(x, w, b, s, p, op, "none"))
            got = _C.conv_transpose(x, weights, "tanh")
            assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), \
                f"n={n} {size}x{size} k={k} s={s}: max abs err {(got - want).abs().max():.3g}"
    finally:
        torch.set_num_threads(previous)


def test_layouts_and_tanh_range():
    """Any input memory format; output channels_last; tanh accurate from tiny to saturated pre-activations."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 6, 5, generator=g)
    w = torch.randn(8, 24, 3, 3, generator=g)
    b = torch.linspace(-30, 30, 24)
    weights = _C.conv_transpose_prepare(w, b, 2, 1, 1)
    want = torch.tanh(F.conv_transpose2d(x, w, b, 2, 1, 1))
    for xi in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        got = _C.conv_transpose(xi, weights, "tanh")
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(got, want, atol=1e-6, rtol=0), f"max abs err {(got - want).abs().max():.3g}"
    z = torch.linspace(-12, 12, 24 * 7).view(1, 24 * 7, 1, 1)  # tanh alone: 1x1 kernel of identity weights
    eye = torch.eye(24 * 7).view(24 * 7, 24 * 7, 1, 1)
    got = _C.conv_transpose(z, _C.conv_transpose_prepare(eye, torch.zeros(24 * 7), 1, 0, 0), "tanh")
    assert torch.allclose(got, torch.tanh(z), atol=2e-7, rtol=0), f"max abs err {(got - torch.tanh(z)).abs().max()}"


def test_bad_arguments_raise_value_error():
    w, b = torch.randn(4, 6, 3, 3), torch.zeros(6)
    weights = _C.conv_transpose_prepare(w, b, 2, 1, 0)
    cases = [
        (lambda: _C.conv_transpose_prepare(w.double(), b, 2, 1, 0), "weight must be a float32"),
        (lambda: _C.conv_transpose_prepare(torch.randn(4, 6, 3, 2), b, 2, 1, 0), "kernel must be square"),
        (lambda: _C.conv_transpose_prepare(w, torch.zeros(5), 2, 1, 0), "bias must be a float32 CPU tensor of 6"),
        (lambda: _C.conv_transpose_prepare(w, b, 2, 1, 2), "0 <= output_padding < stride"),
        (lambda: _C.conv_transpose_prepare(w, b, 0, 1, 0), "stride >= 1"),
        (lambda: _C.conv_transpose_prepare(torch.randn(4, 6, 17, 17), b, 2, 1, 0), "k <= 16"),
        (lambda: _C.conv_transpose_prepare(w, b, 2, 1, 0, "sse"), "unknown isa 'sse'"),
        (lambda: _C.conv_transpose(torch.randn(1, 5, 3, 3), weights, "relu"), "x has 5 channels, the weights take 4"),
        (lambda: _C.conv_transpose(torch.randn(4, 3, 3), weights, "relu"), r"\(N, C_in, H, W\)"),
        (lambda: _C.conv_transpose(torch.randn(1, 4, 3, 3).half(), weights, "relu"), "float32"),
        (lambda: _C.conv_transpose(torch.randn(1, 4, 3, 3), weights, "gelu"), "unknown activation 'gelu'"),
        (lambda: _C.conv_transpose(torch.randn(1, 4, 1, 1), _C.conv_transpose_prepare(
            torch.randn(4, 6, 1, 1), b, 1, 1, 0), "none"), "empty output"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_conv2d_bad_arguments_raise_value_error():
    w, b = torch.randn(6, 4, 3, 3), torch.zeros(6)
    weights = _C.conv2d_prepare(w, b, 2, 1)
    cases = [
        (lambda: _C.conv2d_prepare(w.double(), b, 2, 1), r"weight must be a float32 or bfloat16 CPU tensor \(C_out, C_in"),
        (lambda: _C.conv2d_prepare(torch.randn(6, 4, 3, 2), b, 2, 1), "kernel must be square"),
        (lambda: _C.conv2d_prepare(w, torch.zeros(4), 2, 1), "bias must be a float32 CPU tensor of 6"),
        (lambda: _C.conv2d_prepare(w, b, 0, 1), "stride >= 1"),
        (lambda: _C.conv2d_prepare(w, b, 1, -1), "padding >= 0"),
        (lambda: _C.conv2d_prepare(torch.randn(6, 4, 17, 17), b, 2, 1), "k <= 16"),
        (lambda: _C.conv2d_prepare(w, b, 2, 1, "sse"), "conv2d_prepare: unknown isa 'sse'"),
        (lambda: _C.conv2d(torch.randn(1, 5, 3, 3), weights), "x has 5 channels, the weights take 4"),
        (lambda: _C.conv2d(torch.randn(4, 3, 3), weights), r"\(N, C_in, H, W\)"),
        (lambda: _C.conv2d(torch.randn(1, 4, 3, 3).half(), weights), "float32"),
        (lambda: _C.conv2d(torch.randn(1, 4, 3, 3), weights, "gelu"), "conv2d: unknown activation 'gelu'"),
        (lambda: _C.conv2d(torch.randn(1, 4, 1, 4), _C.conv2d_prepare(w, b, 1, 0)), "smaller than the kernel"),
        (lambda: _C.conv2d(torch.randn(1, 6, 3, 3), _C.conv_transpose_prepare(w, b[:4], 1, 0)),
         "prepared by conv_transpose_prepare"),
        (lambda: _C.conv_transpose(torch.randn(1, 4, 3, 3), weights), "prepared by conv2d_prepare"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_auto_isa_follows_the_extension_switch(tile_isa):
    """isa "auto" takes the ISA _C.set_simd_isa selected (vec.h), for every kernel of the extension at once, and
    for bf16 weights the native bf16 tiles where the CPU has AVX512-BF16; there are no scalar tiles, so a scalar
    switch makes "auto" a ValueError (an explicit ISA still works)."""
    w, b = torch.randn(4, 6, 3, 3), torch.zeros(6)
    switch = "avx512" if tile_isa == "avx512_bf16" else tile_isa  # the extension's switch knows no avx512_bf16
    previous = _C.set_simd_isa(switch)  # the CPU has the tiles, so it has this switch too
    try:
        assert _C.conv_transpose_prepare(w, b, 2, 1, 0).isa == switch
        assert _C.conv2d_prepare(w.transpose(0, 1), b, 2, 1).isa == switch
        native_bf16 = tile_isa_missing("avx512_bf16") is None and switch == "avx512"
        assert _C.conv2d_prepare(w.transpose(0, 1).bfloat16(), b, 2, 1).isa == ("avx512_bf16" if native_bf16
                                                                                else switch)
        _C.set_simd_isa("scalar")
        with pytest.raises(ValueError, match="no scalar kernel"):
            _C.conv_transpose_prepare(w, b, 2, 1, 0)
        with pytest.raises(ValueError, match="conv2d_prepare: no scalar kernel"):
            _C.conv2d_prepare(w.transpose(0, 1), b, 2, 1)
        assert _C.conv_transpose_prepare(w, b, 2, 1, 0, tile_isa).isa == tile_isa
    finally:
        _C.set_simd_isa(previous)


def test_outputs_the_caller_holds_are_never_recycled():
    """The ops reuse a layer's output buffer only once the caller has dropped it (and every view of it)."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(6, 20, 4, 4, generator=g), torch.randn(20, generator=g)
    layers = [(_C.conv_transpose, _C.conv_transpose_prepare(w, b, 2, 1, 0),
               lambda x: reference(x, w, b, 2, 1, 0, "relu")),
              (_C.conv_transpose, _C.conv_transpose_prepare(w[:, :3], b[:3], 2, 1, 0),  # col2im
               lambda x: reference(x, w[:, :3], b[:3], 2, 1, 0, "relu")),
              (_C.conv2d, _C.conv2d_prepare(w.transpose(0, 1).contiguous(), b, 2, 1),
               lambda x: torch.relu(F.conv2d(x, w.transpose(0, 1), b, 2, 1)))]
    for run, weights, want_of in layers:
        xs = [torch.randn(2, 6, 5, 5, generator=g) for _ in range(3)]
        first = run(xs[0], weights, "relu")
        view = run(xs[1], weights, "relu")[0]  # only a view survives
        last = run(xs[2], weights, "relu")
        for x, got in ((xs[0], first), (xs[1], view[None]), (xs[2], last)):
            assert torch.allclose(got[:1], want_of(x)[:1], atol=ATOL, rtol=RTOL)
        ptr = last.data_ptr()
        del last, got
        assert run(xs[0], weights, "relu").data_ptr() == ptr  # dropped: recycled
