"""Triton transposed convolution (kernels/conv_transpose.py) vs its plain-PyTorch fp32 reference and
F.conv_transpose2d, on small odd shapes (runs under TRITON_INTERPRET=1 on a CPU; at speed on a GPU)."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import aigc_rt
from aigc_rt.backends.torch_backend import fp32_convolutions
from aigc_rt.kernels.conv_transpose import conv_transpose2d, conv_transpose2d_reference
from test_triton_kernels import DEV as DEVICE, pytestmark  # noqa: F401  (pytestmark: skip without a GPU/interpreter)

ATOL, RTOL = 1e-4, 1e-5  # fp32 ("ieee" dot)

# (N, C_in, C_out, H, W, k, stride, padding, output_padding)
SHAPES = [
    (1, 20, 17, 1, 1, 4, 1, 0, 0),  # a 1x1 input: one phase per output pixel, a plain GEMM
    (2, 3, 5, 1, 1, 4, 2, 1, 1),
    (2, 24, 16, 4, 4, 4, 2, 1, 0),  # DCGAN's stride-2 layer
    (1, 17, 3, 6, 5, 4, 2, 1, 0),  # the RGB layer: few output channels
    (2, 17, 33, 5, 7, 3, 2, 1, 1),
    (1, 5, 1, 3, 2, 5, 3, 2, 2),
    (2, 19, 40, 3, 4, 2, 3, 0, 1),  # stride > kernel: some outputs get no tap (bias only)
    (1, 7, 9, 6, 5, 1, 1, 0, 0),
    (1, 33, 18, 5, 6, 4, 1, 3, 0),  # padding that crops (torch's padded path rejects it)
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape):
    n, cin, cout, h, w_, k, s, p, op = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, cin, h, w_, generator=g).to(DEVICE)
    w = (torch.randn(cin, cout, k, k, generator=g) * 2 / (cin * k) ** 0.5).to(DEVICE)
    b = torch.randn(cout, generator=g).to(DEVICE)
    if p < k - 1:  # where torch can: the reference is F.conv_transpose2d itself (fp32; cuDNN's default is TF32)
        with fp32_convolutions():
            torch_out = F.conv_transpose2d(x, w, b, s, p, op)
        torch.testing.assert_close(conv_transpose2d_reference(x, w, b, s, p, op), torch_out, atol=1e-5, rtol=1e-5)
    for act in ("none", "relu", "tanh"):
        want = conv_transpose2d_reference(x, w, b, s, p, op, act)
        got = conv_transpose2d(x, w, b, s, p, op, act)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"{act}: max abs err {(got - want).abs().max():.3g}"


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_bf16_weights_multiply_the_input_rounded_to_bf16(shape):
    """bf16 weights (a bf16 file's): the kernel rounds the input to bf16 (to nearest even: the interpreter's own
    cast truncates) and multiplies on bf16 products, exact, summed in fp32: the fp32 reference on the rounded
    operands to fp32 tolerances, for an fp32 input and for one already bf16; out_dtype=bf16 stores that output
    rounded, bit for bit."""
    n, cin, cout, h, w_, k, s, p, op = shape
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = torch.randn(n, cin, h, w_, generator=g).to(DEVICE)
    w = (torch.randn(cin, cout, k, k, generator=g) * 2 / (cin * k) ** 0.5).bfloat16().to(DEVICE)
    b = torch.randn(cout, generator=g).to(DEVICE)
    want = conv_transpose2d_reference(x.bfloat16().float(), w.float(), b, s, p, op, "relu")
    for x_given in (x, x.bfloat16()):
        got = conv_transpose2d(x_given, w, b, s, p, op, "relu")
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {(got - want).abs().max():.3g}"
    rounded = conv_transpose2d(x, w, b, s, p, op, "relu", out_dtype=torch.bfloat16)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, got.bfloat16())


def test_strided_weight_and_no_bias():
    """A weight kept as [k, k, C_in, C_out] in memory (viewed as (C_in, C_out, k, k)), a non-contiguous input."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 9, 3, generator=g).transpose(2, 3).to(DEVICE)  # (2, 5, 3, 9), strided
    w = torch.randn(4, 4, 5, 6, generator=g).permute(2, 3, 0, 1).to(DEVICE)  # (5, 6, 4, 4)
    want = conv_transpose2d_reference(x, w, None, 2, 1, 0, "relu")
    got = conv_transpose2d(x, w, None, 2, 1, 0, "relu")
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {(got - want).abs().max():.3g}"


def test_bad_arguments_raise_value_error():
    x, w = torch.randn(1, 4, 3, 3), torch.randn(4, 6, 3, 3)
    for kwargs, message in [
        (dict(x=x.double()), "must be float32 or bfloat16"),
        (dict(w=w.half()), "must be float32 or bfloat16"),
        (dict(out_dtype=torch.float16), "out_dtype must be torch.float32 or torch.bfloat16"),
        (dict(w=torch.randn(5, 6, 3, 3)), "C_in=4"),
        (dict(w=torch.randn(4, 6, 3, 2)), "square"),
        (dict(bias=torch.zeros(5)), r"bias must be float32 \(6,\)"),
        (dict(act="gelu"), "act must be one of"),
        (dict(stride=2, output_padding=2), "output_padding < stride"),
        (dict(padding=3), "empty output"),
    ]:
        args = dict(x=x, w=w, bias=None, stride=1, padding=0, output_padding=0, act="none") | kwargs
        with pytest.raises(ValueError, match=message):
            conv_transpose2d(**args)


def test_whole_seed_generator_on_the_triton_backend(tmp_path):
    """The 32x32 seed generator, converted (BatchNorm folded), loaded with backend="triton" (every layer on the
    Triton kernel) vs the eval-mode torch module with non-trivial BatchNorm statistics (fp32, atol 1e-4); its
    discriminator runs there too (kernels/conv2d.py)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    from dcgan_reference import randomize_batchnorm, seed_discriminator, seed_generator

    torch.manual_seed(0)
    g_module, d_module = randomize_batchnorm(seed_generator(), seed=1), randomize_batchnorm(seed_discriminator(), 2)
    torch.save(g_module.state_dict(), tmp_path / "g.pt")
    torch.save(d_module.state_dict(), tmp_path / "d.pt")
    g = aigc_rt.load(aigc_rt.convert(tmp_path / "g.pt", tmp_path / "g.safetensors"), device=DEVICE, backend="triton")
    d = aigc_rt.load(aigc_rt.convert(tmp_path / "d.pt", tmp_path / "d.safetensors"), device=DEVICE, backend="triton")
    assert g.backend.name == "triton"
    images = g.generate(2, seed=2)  # (2, 3, 32, 32)
    z = torch.randn(2, 100, generator=torch.Generator().manual_seed(2))  # generate's documented latents
    with torch.no_grad():
        want, want_score = g_module(z[:, :, None, None]), d_module(images.cpu())
    got = images.cpu()
    assert want.std() > 1e-3, "degenerate reference output: the comparison would prove little"
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {(got - want).abs().max():.3g}"
    got_score = d.score(images).cpu()
    assert torch.allclose(got_score, want_score, atol=ATOL), f"max abs err {(got_score - want_score).abs().max():.3g}"


def test_whole_tutorial_generator_on_the_triton_backend(tmp_path):
    """The 64x64 generator of the PyTorch DCGAN tutorial (nz=100, ngf=64: 100->512->256->128->64->3, BN + ReLU,
    Tanh), converted through aigc_rt.convert (BatchNorm folded), loaded with backend="triton" vs the eval-mode
    torch module with non-trivial BatchNorm running statistics; fp32, atol 1e-4. Batch 2 only: the interpreter
    is slow (~10 s on 2 cores), and two latents still exercise the batch index."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    from dcgan_reference import randomize_batchnorm, tutorial_generator

    torch.manual_seed(3)
    g_module = randomize_batchnorm(tutorial_generator(nz=100, ngf=64), seed=4)
    torch.save(g_module.state_dict(), tmp_path / "netG.pth")
    g = aigc_rt.load(aigc_rt.convert(tmp_path / "netG.pth", tmp_path / "g.safetensors"), device=DEVICE,
                     backend="triton")
    assert g.backend.name == "triton" and g.config.image_size == 64
    z = torch.randn(2, 100, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = g_module(z[:, :, None, None])
    got = g(z.to(DEVICE)).cpu()
    assert got.shape == want.shape == (2, 3, 64, 64) and got.dtype == torch.float32
    assert want.std() > 1e-3, "degenerate reference output: the comparison would prove little"
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {(got - want).abs().max():.3g}"
