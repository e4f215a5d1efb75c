"""Triton convolution (kernels/conv2d.py) vs its plain-PyTorch fp32 reference and F.conv2d, on small odd shapes,
every activation of both Triton convolutions (their shared epilogue), and the DCGAN discriminators on the triton
backend (runs under TRITON_INTERPRET=1 on a CPU; at speed on a GPU)."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import aigc_rt
from aigc_rt.backends.torch_backend import fp32_convolutions
from aigc_rt.kernels import conv2d as conv2d_module
from aigc_rt.backends.torch_backend import CONV_ACTIVATIONS
from aigc_rt.kernels.conv2d import conv2d, conv2d_reference
from aigc_rt.kernels.conv_transpose import conv_transpose2d, conv_transpose2d_reference
from aigc_rt.kernels.utils import CONV_ACTS
from test_triton_kernels import DEV as DEVICE, ON_GPU
from test_triton_kernels import pytestmark  # noqa: F401  (skip without a GPU/interpreter)

ATOL, RTOL = 1e-4, 1e-5  # fp32 ("ieee" dot)
SLOPE = 0.13  # leaky_relu's negative slope: not the default 0.2, so that a dropped argument shows
TORCH_ACTS = {"none": lambda y: y, "leaky_relu": lambda y: F.leaky_relu(y, SLOPE), "sigmoid": torch.sigmoid}

# (N, C_in, C_out, H, W, k, stride, padding)
SHAPES = [
    (2, 3, 16, 16, 15, 4, 2, 1),  # DCGAN's first layer (RGB in), two BLOCK_M tiles of pixels
    (2, 16, 40, 8, 8, 4, 2, 1),  # DCGAN's stride-2 layers at small channel counts
    (3, 33, 1, 4, 4, 4, 1, 0),  # DCGAN's last layer: 4x4 -> 1x1, one output channel (BLOCK_N 16, masked)
    (1, 17, 1, 5, 4, 4, 1, 0),  # ... on a non-square input: a 2x1 output
    (3, 1, 5, 7, 5, 3, 1, 1),  # one input channel
    (2, 17, 40, 9, 6, 5, 3, 2),
    (1, 3, 5, 6, 11, 2, 2, 0),
    (2, 33, 16, 5, 7, 1, 1, 0),  # a 1x1 kernel: a plain GEMM over channels
    (2, 3, 5, 7, 9, 1, 3, 0),  # stride > kernel: input pixels skipped
    (3, 17, 1, 3, 5, 3, 2, 2),  # padding large enough that corner outputs see only zeros (bias only)
    (1, 5, 70, 2, 3, 5, 1, 2),  # a kernel larger than the image; C_out over two BLOCK_N tiles
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape):
    n, cin, cout, h, w_, k, s, p = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, cin, h, w_, generator=g).to(DEVICE)
    w = (torch.randn(cout, cin, k, k, generator=g) * 2 / (cin * k * k) ** 0.5).to(DEVICE)
    b = torch.randn(cout, generator=g).to(DEVICE)
    with fp32_convolutions():  # the reference is F.conv2d itself (fp32; cuDNN's default is TF32)
        torch_out = F.conv2d(x, w, b, s, p)
    for act in ("none", "leaky_relu", "sigmoid"):
        want = conv2d_reference(x, w, b, s, p, act, SLOPE)
        torch.testing.assert_close(want, TORCH_ACTS[act](torch_out), atol=1e-5, rtol=1e-5)
        got = conv2d(x, w, b, s, p, act, SLOPE)
        assert got.shape == want.shape and got.is_contiguous()
        assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"{act}: max abs err {(got - want).abs().max():.3g}"


@pytest.mark.parametrize("shape", SHAPES[:3] + [SHAPES[4]], ids=lambda s: "x".join(map(str, s)))
def test_bf16_weights_multiply_the_input_rounded_to_bf16(shape):
    """bf16 weights (a bf16 file's): the kernel rounds the input to bf16 (to nearest even: the interpreter's own
    cast truncates) and multiplies on bf16 products, exact, summed in fp32: the fp32 reference on the rounded
    operands to fp32 tolerances, for an fp32 input and for one already bf16, by tap and with few input channels
    (the flattened K); out_dtype=bf16 stores that output rounded, bit for bit."""
    n, cin, cout, h, w_, k, s, p = shape
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = torch.randn(n, cin, h, w_, generator=g).to(DEVICE)
    w = (torch.randn(cout, cin, k, k, generator=g) * 2 / (cin * k * k) ** 0.5).bfloat16().to(DEVICE)
    b = torch.randn(cout, generator=g).to(DEVICE)
    want = conv2d_reference(x.bfloat16().float(), w.float(), b, s, p, "leaky_relu", SLOPE)
    for x_given in (x, x.bfloat16()):
        got = conv2d(x_given, w, b, s, p, "leaky_relu", SLOPE)
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {(got - want).abs().max():.3g}"
    rounded = conv2d(x, w, b, s, p, "leaky_relu", SLOPE, out_dtype=torch.bfloat16)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, got.bfloat16())


def test_strided_weight_and_input_no_bias():
    """A weight kept as [k, k, C_in, C_out] in memory (viewed as (C_out, C_in, k, k)), a non-contiguous input."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 9, 7, generator=g).transpose(2, 3).to(DEVICE)  # (2, 5, 7, 9), strided
    w = torch.randn(4, 4, 5, 6, generator=g).permute(3, 2, 0, 1).to(DEVICE)  # (6, 5, 4, 4)
    assert not x.is_contiguous() and not w.is_contiguous()
    want = conv2d_reference(x, w, None, 2, 1, "leaky_relu")
    got = conv2d(x, w, None, 2, 1, "leaky_relu")
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {(got - want).abs().max():.3g}"


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # tanh's e^2y -> inf, by design
@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_every_activation_at_large_magnitudes(transposed):
    """Both convolutions take every activation (utils.CONV_ACTS, applied by utils.conv_epilogue): biases of +-100,
    +-30 and 0 give finite values equal to torch's; the sigmoid to a relative 1e-5 also where it is tiny
    (sigmoid(-30) ~ 1e-13: e / (1 + e), no cancellation; below FLT_MIN, where a GPU flushes denormals, to an
    absolute 1e-37), tanh and sigmoid exactly 1 where they round to it."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 4, 4, generator=g).to(DEVICE)
    b = torch.tensor([100.0, -100.0, 30.0, -30.0, 0.0]).to(DEVICE)
    if transposed:
        w = (torch.randn(3, 5, 3, 3, generator=g) * 0.01).to(DEVICE)
        run, ref = conv_transpose2d, lambda act: conv_transpose2d_reference(x, w, b, 2, 1, 1, act, SLOPE)
        got_of = lambda act: run(x, w, b, 2, 1, 1, act, SLOPE)  # noqa: E731
    else:
        w = (torch.randn(5, 3, 4, 4, generator=g) * 0.01).to(DEVICE)
        ref = lambda act: conv2d_reference(x, w, b, 1, 1, act, SLOPE)  # noqa: E731
        got_of = lambda act: conv2d(x, w, b, 1, 1, act, SLOPE)  # noqa: E731
    pre = ref("none")
    for act in CONV_ACTS:
        got, want = got_of(act), ref(act)
        torch.testing.assert_close(want, CONV_ACTIVATIONS[act](pre, SLOPE))  # the reference applies torch's act
        assert torch.isfinite(got).all(), act
        assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"{act}: max abs err {(got - want).abs().max():.3g}"
    sig = got_of("sigmoid")
    assert torch.allclose(sig, torch.sigmoid(pre), atol=1e-37, rtol=1e-5), \
        f"sigmoid: max rel err {((sig - torch.sigmoid(pre)) / torch.sigmoid(pre)).abs().max():.3g}"
    assert (sig[:, 0] == 1).all() and (got_of("tanh")[:, 0] == 1).all(), "sigmoid / tanh (100) round to 1 in fp32"


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
def test_fp32_on_the_gpus_tensor_core_path(monkeypatch, transposed):
    """fp32 convolutions as a GPU runs them (utils.SPLIT_FP32_CONVS, off in the interpreter to keep its tests quick):
    input and weights each split into three bf16 parts, six bf16 dots (utils.dot_fp32), within the fp32 tolerances
    of the reference; on a GPU the default path, so tested there by every fp32 convolution test."""
    from aigc_rt.kernels import utils
    monkeypatch.setattr(utils, "SPLIT_FP32_CONVS", True)
    assert utils.conv_precision("ieee") == "bf16x6" and utils.conv_precision("tf32") == "tf32"
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 17, 5, 6, generator=g).to(DEVICE)
    b = torch.randn(9, generator=g).to(DEVICE)
    if transposed:
        w = (torch.randn(17, 9, 4, 4, generator=g) * 2 / (17 * 4) ** 0.5).to(DEVICE)
        got, want = (f(x, w, b, 2, 1, 0, "relu") for f in (conv_transpose2d, conv_transpose2d_reference))
    else:
        w = (torch.randn(9, 17, 3, 3, generator=g) * 2 / (17 * 9) ** 0.5).to(DEVICE)
        got, want = (f(x, w, b, 1, 1, "leaky_relu", SLOPE) for f in (conv2d, conv2d_reference))
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {(got - want).abs().max():.3g}"


def test_bad_arguments_raise_value_error():
    x, w = torch.randn(1, 4, 3, 3), torch.randn(6, 4, 3, 3)
    for kwargs, message in [
        (dict(x=x.double()), "must be float32 or bfloat16"),
        (dict(x=x[0]), "must be float32"),  # 3-d
        (dict(w=w.half()), "must be float32 or bfloat16"),
        (dict(out_dtype=torch.float16), "out_dtype must be torch.float32 or torch.bfloat16"),
        (dict(w=torch.randn(6, 5, 3, 3)), "C_in=4"),
        (dict(w=torch.randn(6, 4, 3, 2)), "square"),
        (dict(bias=torch.zeros(5)), r"bias must be float32 \(6,\)"),
        (dict(bias=torch.zeros(6, dtype=torch.float64)), r"bias must be float32 \(6,\)"),
        (dict(act="gelu"), "act must be one of"),
        (dict(input_precision="fp64"), "input_precision must be 'ieee' or 'tf32'"),
        (dict(stride=0), "stride >= 1"),
        (dict(padding=-1), "padding >= 0"),
        (dict(w=torch.randn(6, 4, 5, 5)), "empty output"),
        (dict(x=torch.randn(0, 4, 3, 3)), "empty output"),
    ]:
        args = dict(x=x, w=w, bias=None, stride=1, padding=0, act="none") | kwargs
        with pytest.raises(ValueError, match=message):
            conv2d(**args)


@pytest.mark.parametrize("variant", ["seed32", "tutorial64"])
def test_whole_discriminator_on_the_triton_backend(variant, tmp_path, monkeypatch):
    """The 32x32 seed discriminator and the 64x64 one of the PyTorch DCGAN tutorial (one more 256->512 layer),
    converted through aigc_rt.convert (BatchNorm folded), loaded with backend="triton" (every layer on the Triton
    kernel) vs the eval-mode torch module with non-trivial BatchNorm running statistics; fp32, atol 1e-4."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    from dcgan_reference import randomize_batchnorm, seed_discriminator, tutorial_discriminator

    torch.manual_seed(6)
    d_module = randomize_batchnorm(seed_discriminator() if variant == "seed32" else tutorial_discriminator(), 7)
    torch.save(d_module.state_dict(), tmp_path / "d.pt")
    d = aigc_rt.load(aigc_rt.convert(tmp_path / "d.pt", tmp_path / "d.safetensors"), device=DEVICE, backend="triton")
    size = d.config.image_size
    assert d.backend.name == "triton" and size == (32 if variant == "seed32" else 64)
    calls = []
    monkeypatch.setattr(conv2d_module, "conv2d", lambda *args, **kw: calls.append(1) or conv2d(*args, **kw))
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        want = d_module(images)
    got = d.score(images.to(DEVICE)).cpu()
    assert len(calls) == len(d.config.layers), "a layer did not run on the Triton kernel"
    assert got.shape == want.shape == (2,) and got.dtype == torch.float32
    assert want.std() > 1e-3, "degenerate reference output: the comparison would prove little"
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {(got - want).abs().max():.3g}"


def test_image_models_hand_back_outputs_no_later_call_overwrites(seed_gan):
    """The triton backend runs a DCGAN's whole forward through run_layers (one CUDA graph per model, input
    shape and forward on a GPU, replayed from static buffers): each call's result stays the caller's and matches
    the torch module, across calls with other inputs and other batch sizes, and a discriminator's logits and
    scores never share a graph; fp32, atol 1e-4."""
    g_module, g_file, d_module, d_file = seed_gan
    g = aigc_rt.load(g_file, device=DEVICE, backend="triton")
    d = aigc_rt.load(d_file, device=DEVICE, backend="triton")
    gen = torch.Generator().manual_seed(12)
    zs = [torch.randn(n, 100, generator=gen) for n in (2, 1, 2)]
    images = [g(z) for z in zs]  # all held at once
    scores = [d(x) for x in images]
    logits = [d.logits(x) for x in images]  # the same model and shapes, another forward: graphs of their own
    with torch.no_grad():
        for x, l in zip(images, logits):
            want_l = d_module.main[:-1](x.cpu()).reshape(-1)  # without the Sigmoid
            err = (l.cpu() - want_l).abs().max()
            assert torch.allclose(l.cpu(), want_l, atol=ATOL, rtol=RTOL), f"logits: max abs err {err:.3g}"
        for z, x, p in zip(zs, images, scores):
            want_x = g_module(z[:, :, None, None])
            err = (x.cpu() - want_x).abs().max()
            assert torch.allclose(x.cpu(), want_x, atol=ATOL, rtol=RTOL), f"images: max abs err {err:.3g}"
            want_p = d_module(x.cpu())
            err = (p.cpu() - want_p).abs().max()
            assert torch.allclose(p.cpu(), want_p, atol=ATOL, rtol=RTOL), f"scores: max abs err {err:.3g}"
    for m, forwards in ((g, ["_forward"]), (d, ["_forward", "_forward_logits"])):  # an entry per shape and forward
        keys = m.backend.layer_graphs.entries
        assert sorted((key[3][0][0], key[2]) for key in keys) == sorted((n, f) for n in (1, 2) for f in forwards)
        assert all(key[1] is m for key in keys)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (AIGC_RT_GPU=1)")
def test_image_model_graph_replay_equals_eager(seed_gan):
    """On a GPU the forwards are captured, and a replay gives bitwise the eager run's images and scores."""
    _, g_file, _, d_file = seed_gan
    z = torch.randn(3, 100, generator=torch.Generator().manual_seed(13))
    for file, make_input in ((g_file, lambda: z), (d_file, lambda: torch.rand(3, 3, 32, 32) * 2 - 1)):
        m = aigc_rt.load(file, device="cuda", backend="triton")
        assert m.backend.layer_graphs.capture
        x = make_input().cuda()
        first, replayed = m(x), m(x)  # eager + capture, then a replay
        assert any(e.graph is not None for e in m.backend.layer_graphs.entries.values()), "never captured"
        m.backend.layer_graphs.capture = False
        m.backend.layer_graphs.entries.clear()
        eager = m(x)
        assert torch.equal(first, eager) and torch.equal(replayed, eager)


def test_bf16_dcgans_on_the_triton_backend(seed_gan, tmp_path):
    """bf16 files on the triton backend: bf16 weights, each layer's input rounded to bf16 in the kernel and handed
    on as bf16 between layers (the same bits as rounding an fp32 output there), the torch backend's arithmetic;
    over the layers a last-bit difference may round an input to the neighbouring bf16 value, hence atol 1e-2
    (tests/test_dcgan.py test_bf16_files)."""
    g_module, _, d_module, _ = seed_gan
    gen = torch.Generator().manual_seed(14)
    for name, module, x in (("g", g_module, torch.randn(2, 100, generator=gen)),
                            ("d", d_module, torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1)):
        torch.save(module.state_dict(), tmp_path / f"{name}.pt")
        path = aigc_rt.convert(tmp_path / f"{name}.pt", tmp_path / f"{name}-bf16.safetensors", dtype="bf16")
        m = aigc_rt.load(path, device=DEVICE, backend="triton")
        assert all(layer.weight.dtype == torch.bfloat16 for layer, _ in m.layers)
        got = m(x.to(DEVICE))
        assert got.dtype == torch.float32
        m.out_bf16 = [False] * len(m.layers)
        assert torch.equal(m(x.to(DEVICE)), got), f"{name}: handing on bf16 outputs changed the result"
        want = aigc_rt.load(path, backend="torch")(x)
        got = got.cpu()
        assert torch.allclose(got, want, atol=1e-2), f"{name}: max abs err {(got - want).abs().max():.3g}"
