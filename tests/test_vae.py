"""The VAE (seed system 5's ELBO): converter (examples/vae and other namings, image shapes, bad checkpoints), the
model on every backend vs PyTorch's examples/vae module (encode, decode, and the ELBO against its loss_function on
the same draws of eps), bf16 / int8 files, seeds, bad input, and the CLI (convert, imagine, validate, elbo, bench).
fp32 tolerance: atol 1e-4 on mu, logvar and pixel means (same math, other summation orders); the ELBO (hundreds of
nats, a sum over every pixel) rtol 1e-5."""
from __future__ import annotations

import copy
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

import aigc_rt
from aigc_rt import FormatError
from aigc_rt.cli import VALIDATE_TOL, main

from test_triton_kernels import DEV

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
from vae_reference import ExamplesVAE, loss_function  # noqa: E402

BACKENDS = ["torch", "cpu", "triton"]  # triton: the interpreter on a CPU (conftest), real kernels on a GPU (DEV)
ATOL, ELBO_RTOL = 1e-4, 1e-5


class DeepVAE(nn.Module):
    """Another common shape: Sequential encoder / decoder, fc_mu / fc_var heads, tanh, a bias-free layer, and
    encoder widths whose last two layers have the heads' shape (so the names must pick the heads)."""

    def __init__(self, d: int, latent: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d, 19), nn.Tanh(), nn.Linear(19, latent, bias=False), nn.Tanh(),
                                     nn.Linear(latent, latent), nn.Tanh())
        self.fc_mu = nn.Linear(latent, latent)
        self.fc_var = nn.Linear(latent, latent)
        self.decoder = nn.Sequential(nn.Linear(latent, 23), nn.Tanh(), nn.Linear(23, 29), nn.Tanh(), nn.Linear(29, d))

    def encode(self, x):
        h = self.encoder(x.reshape(x.shape[0], -1))
        return self.fc_mu(h), self.fc_var(h)

    def decode(self, z):
        return torch.sigmoid(self.decoder(z))


def randomize(module: nn.Module, scale: float, seed: int) -> nn.Module:
    """Weights drawn wider than torch's init, so that logvar and the pixel means spread."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(p.shape[-1]))
    return module.eval()


@pytest.fixture(scope="module")
def examples_vae(tmp_path_factory):
    """(checkpoint, runtime fp32 file, the module) of examples/vae at its real sizes (MNIST, 784-400-20)."""
    folder = tmp_path_factory.mktemp("vae")
    module = randomize(ExamplesVAE(), 1.5, seed=0)
    torch.save(module.state_dict(), folder / "vae.pt")
    return folder / "vae.pt", aigc_rt.convert(folder / "vae.pt", folder / "vae.safetensors"), module


@pytest.fixture(scope="module")
def small_vae(tmp_path_factory):
    """The same at odd small sizes (3 x 5 x 7 images = 105 values, hidden 37, latent 6): the triton backend's
    interpreter runs it in seconds."""
    folder = tmp_path_factory.mktemp("small_vae")
    module = randomize(ExamplesVAE(105, 37, 6), 1.5, seed=1)
    torch.save(module.state_dict(), folder / "vae.pt")
    path = aigc_rt.convert(folder / "vae.pt", folder / "vae.safetensors", config={"channels": 3, "height": 5,
                                                                                     "width": 7})
    return folder / "vae.pt", path, module


def load_on(path, backend: str):
    return aigc_rt.load(path, device=DEV if backend == "triton" else "cpu", backend=backend)


def images(n: int, shape, seed: int) -> torch.Tensor:
    """n images in [0, 1], a third of the pixels exactly 0 or 1 (binarised MNIST is all 0s and 1s)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    return torch.where(x < 0.15, 0.0, torch.where(x > 0.85, 1.0, x))


def reference_elbo(module, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The ELBO per image (N,) from examples/vae's forward and loss_function, averaged over eps (S, N, L), in
    float64: in float32, log(1 - sigmoid(l)) loses digits (and binary_cross_entropy clamps it at -100) where
    sigmoid(l) rounds towards 1, which the runtime's ELBO (from the logits) does not."""
    module, x = copy.deepcopy(module).double(), x.double()
    with torch.no_grad():
        losses = []
        for e in eps.double():
            recon, mu, logvar = module(x, e)
            losses.append(loss_function(recon, x, mu, logvar, reduction="none"))
    return -torch.stack(losses).mean(0).float()


def assert_close(got, want, atol, rtol, what):
    got = got.cpu()
    err = (got - want).abs().max().item()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert err <= atol + rtol * want.abs().max().item(), f"{what}: max abs error {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_examples_vae(examples_vae, small_vae, backend):
    """encode, decode, generate and the ELBO vs the examples/vae module; the triton backend (the interpreter on a
    CPU) on the small VAE, the others on both."""
    for src, path, module in ([small_vae] if backend == "triton" and DEV.type == "cpu" else [examples_vae, small_vae]):
        m = load_on(path, backend)
        c = m.config
        x = images(5, (c.channels, c.height, c.width), seed=2)
        with torch.no_grad():
            mu, logvar = module.encode(x.reshape(5, -1))
        assert logvar.std() > 0.3, "degenerate reference: the comparison would prove little"
        got_mu, got_logvar = m.encode(x)
        assert_close(got_mu, mu, ATOL, 0, f"{backend} mu")
        assert_close(got_logvar, logvar, ATOL, 0, f"{backend} logvar")
        z = torch.randn(4, c.latent, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            means = module.decode(z).reshape(4, c.channels, c.height, c.width)
        assert_close(m.decode(z), means, ATOL, 0, f"{backend} decode")
        assert_close(m(z), means * 2 - 1, 2 * ATOL, 0, f"{backend} images")
        # generate(seed) draws z = torch.randn(n, L) from a CPU generator seeded with seed
        want = module.decode(torch.randn(3, c.latent, generator=torch.Generator().manual_seed(11))) * 2 - 1
        assert_close(m.generate(3, seed=11), want.detach().reshape(3, c.channels, c.height, c.width), 2 * ATOL, 0,
                     f"{backend} generate")
        for samples in (1, 4):
            eps = torch.randn(samples, 5, c.latent, generator=torch.Generator().manual_seed(9))  # what seed=9 draws
            assert_close(m.elbo(x, samples=samples, seed=9), reference_elbo(module, x, eps), 0, ELBO_RTOL,
                         f"{backend} ELBO, {samples} samples")


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_low_precision_files(examples_vae, tmp_path, dtype):
    """A bf16 / int8 / int4 file: the cpu kernels match the reference backend's math on the same weights (activations
    rounded to bf16, or int8 blocks, fp32 sums) closely, and the fp32 module within `aigc-rt validate`'s
    tolerances for the dtype."""
    src, _, module = examples_vae
    path = aigc_rt.convert(src, tmp_path / f"{dtype}.safetensors", dtype=dtype)
    cpu, ref = aigc_rt.load(path, backend="cpu"), aigc_rt.load(path, backend="torch")
    x = images(6, (1, 28, 28), seed=4)
    z = torch.randn(6, 20, generator=torch.Generator().manual_seed(5))
    atol, rtol = VALIDATE_TOL[dtype]
    with torch.no_grad():
        mu, logvar = module.encode(x.reshape(6, -1))
        means = module.decode(z)
    eps = torch.randn(1, 6, 20, generator=torch.Generator().manual_seed(0))
    want_elbo = reference_elbo(module, x, eps)
    # int8 activations (int8 and int4 files) are quantised per block on the fly by the cpu kernel, not by the
    # reference: 1e-2
    close = 2e-3 if dtype == "bf16" else 1e-2
    for name, got, same_math, want in (("mu", cpu.encode(x)[0], ref.encode(x)[0], mu),
                                       ("logvar", cpu.encode(x)[1], ref.encode(x)[1], logvar),
                                       ("decode", cpu.decode(z).reshape(6, -1), ref.decode(z).reshape(6, -1), means),
                                       ("ELBO", cpu.elbo(x, seed=0), ref.elbo(x, seed=0), want_elbo)):
        assert_close(got, same_math, close, close, f"{dtype} {name}: cpu vs torch backend")
        assert_close(got, want, atol, rtol, f"{dtype} {name}: vs the fp32 module")


def test_other_namings_shapes_and_tanh(tmp_path):
    """fc_mu / fc_var heads after a Sequential encoder whose last layers have the heads' shape, a bias-free
    linear, tanh hidden layers (config act), two decoder layers, a non-square image shape from config."""
    module = randomize(DeepVAE(6 * 10, 7), 1.2, seed=6)
    torch.save(module.state_dict(), tmp_path / "deep.pt")
    with pytest.raises(FormatError, match="no square image"):
        aigc_rt.convert(tmp_path / "deep.pt", tmp_path / "deep.safetensors")
    path = aigc_rt.convert(tmp_path / "deep.pt", tmp_path / "deep.safetensors",
                           config={"channels": 1, "height": 6, "width": 10, "act": "tanh"})
    m = aigc_rt.load(path, backend="cpu")
    assert (m.config.encoder, m.config.latent, m.config.decoder, m.config.act) == ((19, 7, 7), 7, (23, 29), "tanh")
    x = images(3, (1, 6, 10), seed=7)
    with torch.no_grad():
        mu, logvar = module.encode(x)
        z = torch.randn(3, 7, generator=torch.Generator().manual_seed(8))
        means = module.decode(z).reshape(3, 1, 6, 10)
    assert_close(m.encode(x)[0], mu, ATOL, 0, "mu")
    assert_close(m.encode(x)[1], logvar, ATOL, 0, "logvar")
    assert_close(m.decode(z), means, ATOL, 0, "decode")


def test_image_shapes_from_the_input_width(tmp_path):
    for d, shape in ((784, (1, 28, 28)), (3072, (3, 32, 32)), (49, (1, 7, 7))):
        torch.save(ExamplesVAE(d, 8, 3).state_dict(), tmp_path / "v.pt")
        m = aigc_rt.load(aigc_rt.convert(tmp_path / "v.pt", tmp_path / "v.safetensors"), backend="torch")
        c = m.config
        assert (c.channels, c.height, c.width) == shape
        assert m.generate(2, seed=0).shape == (2, *shape)


def test_detection_and_bad_checkpoints(tmp_path):
    torch.save(nn.DataParallel(ExamplesVAE(16, 5, 2)).state_dict(), tmp_path / "dp.pt")  # `module.` prefix
    info = aigc_rt.load(aigc_rt.convert(tmp_path / "dp.pt", tmp_path / "dp.safetensors"), backend="torch")
    assert info.arch == "vae" and info.config.latent == 2
    mlp = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 10))  # a classifier: no mu / logvar heads
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    for arch in (None, "vae"):
        with pytest.raises(FormatError, match="no way to read these linears as a VAE"):
            aigc_rt.convert(tmp_path / "mlp.pt", tmp_path / "mlp.safetensors", arch=arch)
    g = torch.Generator().manual_seed(0)
    chain = [("enc", 5, 16), ("a", 5, 5), ("b", 5, 5), ("c", 5, 5), ("d", 5, 5), ("out", 16, 5)]
    sd = {f"{name}.weight": torch.randn(o, i, generator=g) for name, o, i in chain}  # (a, b), (b, c), (c, d) fit
    torch.save(sd, tmp_path / "twins.pt")
    with pytest.raises(FormatError, match="more than one way"):
        aigc_rt.convert(tmp_path / "twins.pt", tmp_path / "twins.safetensors", arch="vae")
    torch.save(ExamplesVAE(16, 5, 2).state_dict(), tmp_path / "v.pt")
    for config, error in (({"channels": 1, "height": 4}, "give channels, height and width"),
                          ({"channels": 1, "height": 4, "width": 5}, "20 values; .* takes 16"),
                          ({"act": "gelu"}, "act 'gelu' is not one of"),
                          ({"n_head": 2}, r"may set \['channels', 'height', 'width', 'act'\]"),
                          ({"channels": 2, "height": 2, "width": 4}, "1 or 3 channels")):
        with pytest.raises(ValueError, match=error):
            aigc_rt.convert(tmp_path / "v.pt", tmp_path / "v.safetensors", config=config)


def test_bad_input(small_vae):
    m = aigc_rt.load(small_vae[1], backend="cpu")
    x = images(2, (3, 5, 7), seed=0)
    for bad, error in ((x * 2 - 1, r"pixel values in \[0, 1\]"), (x[:, :2], r"shape \(n, 3, 5, 7\) or \(n, 105\)"),
                       (x.reshape(2, -1)[:0], "n >= 1"), (x.long(), "floating-point"),
                       (torch.full((1, 105), float("nan")), "NaN"), ([[0.5] * 105], "torch.Tensor")):
        for call in (m.encode, m.elbo):
            with pytest.raises(ValueError, match=error):
                call(bad)
    for bad, error in ((torch.randn(2, 5), r"shape \(n, 6\)"), (torch.randn(2, 6, 1, 1), r"shape \(n, 6\)"),
                       (torch.full((1, 6), float("inf")), "infinite")):
        for call in (m, m.decode):
            with pytest.raises(ValueError, match=error):
                call(bad)
    for kw, error in (({"samples": 0}, "samples must be"), ({"samples": 1.5}, "samples must be"),
                      ({"seed": "1"}, "seed must be")):
        with pytest.raises(ValueError, match=error):
            m.elbo(x, **kw)
    for n in (0, True, 2.0):
        with pytest.raises(ValueError, match="n must be"):
            m.generate(n)
    assert torch.equal(m.generate(2, seed=4), m.generate(2, seed=4))
    assert not torch.equal(m.elbo(x, seed=1), m.elbo(x, seed=2))


def test_elbo_over_many_samples_runs_in_chunks(small_vae, monkeypatch):
    """Past CHUNK_LOGITS decoded logits the samples go through in chunks (the last one shorter): the same ELBO."""
    from aigc_rt.models import vae as vae_model
    m = aigc_rt.load(small_vae[1], backend="cpu")
    x = images(3, (3, 5, 7), seed=5)
    whole = m.elbo(x, samples=7, seed=2)
    monkeypatch.setattr(vae_model, "CHUNK_LOGITS", 3 * 105 * 3)  # 3 samples a chunk: 3 + 3 + 1
    assert_close(m.elbo(x, samples=7, seed=2), whole, 0, 1e-6, "chunked ELBO")


def test_elbo_is_a_bound_that_tightens_with_the_right_data(examples_vae):
    """Sanity of the math on the real shapes: the ELBO of an image is below 0 (log p(x) <= 0 for binary x) and
    the images the decoder itself makes (its rounded means) score higher than uniform noise."""
    m = aigc_rt.load(examples_vae[1], backend="cpu")
    made = (m.decode(torch.randn(8, 20, generator=torch.Generator().manual_seed(1))) > 0.5).float()
    noise = (torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    made_elbo, noise_elbo = m.elbo(made, samples=8, seed=0), m.elbo(noise, samples=8, seed=0)
    assert (made_elbo < 0).all() and (noise_elbo < 0).all()
    assert made_elbo.mean() > noise_elbo.mean() + 50, (made_elbo.mean(), noise_elbo.mean())


def test_cli(examples_vae, small_vae, tmp_path, capsys):
    src, _, module = small_vae
    dst = tmp_path / "v.safetensors"
    assert main(["convert", str(src), str(dst), "--image-shape", "3,5,7", "--act", "relu"]) == 0
    assert main(["convert", str(src), str(dst), "--image-shape", "3,5"]) == 2
    assert "--image-shape must be C,H,W" in capsys.readouterr().err
    assert main(["imagine", "--model", str(dst), "-n", "5", "--nrow", "3", "-o", str(tmp_path / "g.png")]) == 0
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (3 * (7 + 2) + 2, 2 * (5 + 2) + 2)
    assert main(["validate", str(dst), "--reference", str(src)]) == 0
    assert "PASS" in capsys.readouterr().out
    other = randomize(ExamplesVAE(105, 37, 6), 1.5, seed=99)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    assert main(["validate", str(dst), "--reference", str(tmp_path / "other.pt")]) == 1
    assert "FAIL" in capsys.readouterr().out
    # elbo on image files: bytes / 255, as torchvision's ToTensor reads them
    pixels = (images(2, (5, 7, 3), seed=3) * 255).round().to(torch.uint8)
    paths = []
    for i, p in enumerate(pixels):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(p.numpy(), mode="RGB").save(paths[-1])
    capsys.readouterr()
    assert main(["elbo", *paths, "--model", str(dst), "--samples", "3", "--seed", "5"]) == 0
    printed = [float(line.split()[0]) for line in capsys.readouterr().out.splitlines()]
    x = pixels.permute(0, 3, 1, 2).contiguous().float() / 255
    eps = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(5))
    assert np.allclose(printed, reference_elbo(module, x, eps).numpy(), atol=2e-3, rtol=0)
    assert main(["elbo", *paths, "--model", str(dst), "--iwae", "16", "--seed", "5"]) == 0
    printed = [float(line.split("log p(x) ~ ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()]
    eps = torch.randn(16, 2, 6, generator=torch.Generator().manual_seed(5))
    assert np.allclose(printed, reference_log_likelihood(module, x, eps).numpy(), atol=2e-3, rtol=0)
    Image.new("RGB", (5, 5)).save(tmp_path / "wrong.png")
    assert main(["elbo", str(tmp_path / "wrong.png"), "--model", str(dst)]) == 2
    assert "5x5 pixels; the VAE takes 7x5" in capsys.readouterr().err
    assert main(["elbo", paths[0], "--model", "dcgan-digits"]) == 2
    assert "needs a vae one" in capsys.readouterr().err
    assert main(["bench", "--model", str(examples_vae[1]), "--batches", "1,64"]) == 0
    out = capsys.readouterr().out
    assert out.count("| vae |") == 2, out
    assert main(["info", str(dst)]) == 0
    assert '"arch": "vae"' in capsys.readouterr().out


@pytest.mark.parametrize("S,N,D,L", [(1, 1, 1, 1), (1, 3, 17, 5), (3, 2, 111, 20), (2, 5, 785, 17)])
def test_cpu_elbo_ops_match_the_reference(isa, S, N, D, L):
    """_C.vae_reparameterize and _C.vae_bernoulli_elbo on every ISA vs TorchBackend's ops in float64, with logits
    from -200 to 200 (where sigmoid rounds to 0 or 1 in float32), x both binary and fractional, a zero logit, odd
    sizes (SIMD tails). Tolerances: z rtol 1e-6 (exp ~1 ulp); the ELBO 1e-6 of the sum of its terms' magnitudes."""
    from aigc_rt import _C
    from aigc_rt.backends.torch_backend import TorchBackend
    ref = TorchBackend(torch.device("cpu"))
    g = torch.Generator().manual_seed(S * 1000 + D)
    head = torch.randn(N, 2 * L, generator=g) * 2
    eps = torch.randn(S, N, L, generator=g)
    got_z, want_z = _C.vae_reparameterize(head, eps), ref.reparameterize(head.double(), eps.double())
    assert_close(got_z, want_z.float(), 1e-6, 1e-6, f"{isa} z")
    logits = torch.randn(S, N, D, generator=g) * torch.tensor([0.1, 3.0, 30.0, 200.0])[torch.arange(D) % 4]
    logits.view(-1)[0] = 0.0
    x = images(N, (D,), seed=D)
    got, want = _C.vae_bernoulli_elbo(logits, x, head), ref.bernoulli_elbo(logits.double(), x.double(),
                                                                          head.double())
    scale = (logits.double().abs().sum(-1).mean(0) + (head.double() ** 2).sum(-1) + head.double().exp().sum(-1))
    err = (got.double() - want).abs()
    assert got.shape == (N,) and (err <= 1e-6 * scale + 1e-6).all(), f"{isa}: max abs error {err.max():.3g}"


def test_cpu_elbo_ops_errors_and_nan():
    from aigc_rt import _C
    head, x = torch.zeros(2, 6), torch.rand(2, 9)
    with pytest.raises(ValueError, match="head must be"):
        _C.vae_reparameterize(torch.zeros(2, 5), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="eps has shape"):
        _C.vae_reparameterize(head, torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="logits have shape"):
        _C.vae_bernoulli_elbo(torch.zeros(1, 2, 8), x, head)
    with pytest.raises(ValueError, match="x has shape"):
        _C.vae_bernoulli_elbo(torch.zeros(1, 2, 9), torch.rand(3, 9), head)
    logits = torch.zeros(1, 2, 9)
    logits[0, 1, 4] = float("nan")
    elbo = _C.vae_bernoulli_elbo(logits, x, head)  # a NaN logit poisons its own image only
    assert elbo[0].isfinite() and elbo[1].isnan()


@pytest.mark.parametrize("S,N,D,L", [(1, 1, 1, 1), (1, 3, 17, 5), (3, 2, 111, 20), (2, 5, 1100, 70)])
def test_triton_elbo_ops_match_the_reference(S, N, D, L):
    """kernels/vae.py (the interpreter on a CPU, the GPU on DEV) vs TorchBackend's ops in float64, as the C++ test:
    logits up to +-200, binary and fractional x, odd sizes, D and L past one block (BLOCK_D 1024, BLOCK_L 64)."""
    from aigc_rt.backends.torch_backend import TorchBackend
    from aigc_rt.kernels import vae as triton_vae
    ref = TorchBackend(torch.device("cpu"))
    g = torch.Generator().manual_seed(S * 1000 + D + 1)
    head = torch.randn(N, 2 * L, generator=g) * 2
    eps = torch.randn(S, N, L, generator=g)
    got_z = triton_vae.reparameterize(head.to(DEV), eps.to(DEV)).cpu()
    assert_close(got_z, ref.reparameterize(head.double(), eps.double()).float(), 1e-6, 1e-6, "triton z")
    logits = torch.randn(S, N, D, generator=g) * torch.tensor([0.1, 3.0, 30.0, 200.0])[torch.arange(D) % 4]
    x = images(N, (D,), seed=D)
    got = triton_vae.bernoulli_elbo(logits.to(DEV), x.to(DEV), head.to(DEV)).cpu()
    want = ref.bernoulli_elbo(logits.double(), x.double(), head.double())
    scale = (logits.double().abs().sum(-1).mean(0) + (head.double() ** 2).sum(-1) + head.double().exp().sum(-1))
    err = (got.double() - want).abs()
    assert got.shape == (N,) and (err <= 1e-6 * scale + 1e-6).all(), f"max abs error {err.max():.3g}"
    with pytest.raises(ValueError, match="logits have shape"):
        triton_vae.bernoulli_elbo(logits[:, :, :-1].contiguous().to(DEV), x.to(DEV), head.to(DEV))
    if D > 1:
        with pytest.raises(ValueError, match="x must be contiguous"):
            triton_vae.bernoulli_elbo(logits.to(DEV), x.repeat_interleave(2, dim=1)[:, ::2].to(DEV), head.to(DEV))


def reference_log_likelihood(module, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The importance-weighted log p(x) (N,) in float64 from examples/vae's encode / decode and torch.distributions:
    logsumexp_k [log p(x | z_k) + log N(z_k; 0, I) - log N(z_k; mu, std)] - log K."""
    from torch.distributions import Normal
    module, x = copy.deepcopy(module).double(), x.double().reshape(len(x), -1)
    with torch.no_grad():
        mu, logvar = module.encode(x)
        std = torch.exp(0.5 * logvar)
        z = mu + eps.double() * std  # (K, N, L)
        log_px = -F.binary_cross_entropy(module.decode(z), x.expand(len(eps), -1, -1), reduction="none").sum(-1)
        log_w = log_px + Normal(0.0, 1.0).log_prob(z).sum(-1) - Normal(mu, std).log_prob(z).sum(-1)
    return (torch.logsumexp(log_w, 0) - math.log(len(eps))).float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_likelihood_matches_the_importance_weighted_reference(small_vae, backend):
    """log_likelihood (IWAE) on every backend vs torch.distributions in float64 on the same draws (rtol 1e-5), in
    chunks too; and it is never below the ELBO of those draws with the KL estimated from them (Jensen)."""
    from aigc_rt.models import vae as vae_model
    src, path, module = small_vae
    m = load_on(path, backend)
    x = images(4, (3, 5, 7), seed=6)
    eps = torch.randn(16, 4, 6, generator=torch.Generator().manual_seed(3))
    want = reference_log_likelihood(module, x, eps)
    got = m.log_likelihood(x, samples=16, seed=3)
    assert_close(got, want, 0, 1e-5, f"{backend} IWAE")
    eps1 = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(3))  # (torch draws small sizes otherwise)
    single = reference_log_likelihood(module, x, eps1)  # K = 1: log w itself, the ELBO with a sampled KL
    assert_close(m.log_likelihood(x, samples=1, seed=3), single, 0, 1e-5, f"{backend} IWAE, K = 1")
    sampled_elbo = torch.stack([reference_log_likelihood(module, x, e[None]) for e in eps]).mean(0)
    assert (got.cpu() >= sampled_elbo - 1e-3).all(), (got, sampled_elbo)
    if backend == "cpu":
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(vae_model, "CHUNK_LOGITS", 5 * 4 * 105)  # 5 samples a chunk: 5 + 5 + 5 + 1
            assert_close(m.log_likelihood(x, samples=16, seed=3), want, 0, 1e-5, "chunked IWAE")


@pytest.mark.parametrize("S,N,D", [(1, 1, 1), (3, 2, 111), (2, 3, 1100)])
def test_log_likelihood_ops_match_the_reference(isa, S, N, D):
    """_C.vae_bernoulli_log_likelihood (every ISA) and kernels/vae.py's (the interpreter, or the GPU) vs
    TorchBackend's in float64, per sample: 1e-6 of the sum of the terms' magnitudes."""
    from aigc_rt import _C
    from aigc_rt.backends.torch_backend import TorchBackend
    from aigc_rt.kernels import vae as triton_vae
    g = torch.Generator().manual_seed(S + D)
    logits = torch.randn(S, N, D, generator=g) * torch.tensor([0.1, 3.0, 30.0, 200.0])[torch.arange(D) % 4]
    x = images(N, (D,), seed=D + 1)
    want = TorchBackend(torch.device("cpu")).bernoulli_log_likelihood(logits.double(), x.double())
    scale = logits.double().abs().sum(-1) + 1
    for name, got in (("cpu", _C.vae_bernoulli_log_likelihood(logits, x)),
                      ("triton", triton_vae.bernoulli_log_likelihood(logits.to(DEV), x.to(DEV)).cpu())):
        err = (got.double() - want).abs()
        assert got.shape == (S, N) and (err <= 1e-6 * scale).all(), f"{name} {isa}: max abs error {err.max():.3g}"
