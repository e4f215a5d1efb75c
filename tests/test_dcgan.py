"""DCGAN: converter (both variants, generator and discriminator, .pt/.pth/.safetensors, `module.` prefix, BN
folding), runtime models vs the torch modules in eval mode with non-trivial BatchNorm statistics (fp32,
atol 1e-4, backends torch and cpu), generate/seeds, save_grid layout, CLI imagine/score, and bad input."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

import aigc_rt
from aigc_rt import format as fmt
from aigc_rt import archs
from aigc_rt.cli import main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
from dcgan_reference import (randomize_batchnorm, seed_discriminator, seed_generator,  # noqa: E402
                             tutorial_discriminator, tutorial_generator)

ATOL, RTOL = 1e-4, 1e-5  # fp32


# name -> (module factory, how it is saved, runtime arch, image size)
VARIANTS = {
    "seed32_g": (seed_generator, "pt", "dcgan", 32),
    "seed32_d": (seed_discriminator, "pth_dataparallel", "dcgan_d", 32),
    "tutorial64_g": (tutorial_generator, "safetensors", "dcgan", 64),
    "tutorial64_d": (tutorial_discriminator, "pt_nested", "dcgan_d", 64),
}


def save_checkpoint(module: nn.Module, how: str, folder) -> str:
    sd = module.state_dict()
    if how == "pt":
        path = os.path.join(folder, "m.pt")
        torch.save(sd, path)
    elif how == "pth_dataparallel":  # DataParallel's `module.` prefix
        path = os.path.join(folder, "m.pth")
        torch.save(nn.DataParallel(module).state_dict(), path)
    elif how == "pt_nested":
        path = os.path.join(folder, "m.pt")
        torch.save({"state_dict": sd, "epoch": torch.tensor(3)}, path)
    else:
        path = os.path.join(folder, "m.safetensors")
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, torch module in eval mode, checkpoint path, converted runtime file)."""
    make, how, _, _ = VARIANTS[request.param]
    torch.manual_seed(list(VARIANTS).index(request.param))
    module = randomize_batchnorm(make(), seed=len(request.param))
    folder = tmp_path_factory.mktemp(request.param)
    src = save_checkpoint(module, how, folder)
    dst = aigc_rt.convert(src, folder / "rt.safetensors")  # arch read from the tensor shapes
    return request.param, module, src, dst


def test_converter_reads_the_variant_from_the_shapes(variant):
    name, module, src, dst = variant
    _, _, arch, size = VARIANTS[name]
    rf = fmt.read(dst, archs.expected)
    assert rf.arch == arch and rf.config["image_size"] == size
    convs = [m for m in module.main if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    layers = rf.config["layers"]
    assert len(layers) == len(convs)
    for layer, conv in zip(layers, convs):
        assert (layer["c_in"], layer["c_out"], layer["kernel"]) == (conv.in_channels, conv.out_channels, 4)
        assert (layer["stride"], layer["padding"]) == (conv.stride[0], conv.padding[0])
    acts = [layer["act"] for layer in layers]
    assert acts == (["relu"] * (len(convs) - 1) + ["tanh"] if arch == "dcgan" else
                    ["leaky_relu"] * (len(convs) - 1) + ["sigmoid"])


def test_batchnorm_folded_into_the_weights(variant):
    """File weights/biases == torch's own conv+BN fusion (torch.nn.utils.fusion) of the eval-mode module."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    name, module, _, dst = variant
    rf = fmt.read(dst, archs.expected)
    mods = list(module.main)
    convs = [i for i, m in enumerate(mods) if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    for layer, i in enumerate(convs):
        conv, bn = mods[i], mods[i + 1] if isinstance(mods[i + 1], nn.BatchNorm2d) else None
        if bn is None:
            want_w, want_b = conv.weight, torch.zeros(conv.out_channels)
        else:
            want_w, want_b = fuse_conv_bn_weights(conv.weight, None, bn.running_mean, bn.running_var, bn.eps,
                                                  bn.weight, bn.bias, transpose=isinstance(conv, nn.ConvTranspose2d))
        got_w, got_b = rf.tensors[f"layers.{layer}.weight"], rf.tensors[f"layers.{layer}.bias"]
        assert torch.allclose(got_w, want_w, atol=1e-6, rtol=1e-5), f"layer {layer}: {(got_w - want_w).abs().max()}"
        assert torch.allclose(got_b, want_b, atol=1e-6, rtol=1e-5), f"layer {layer}: {(got_b - want_b).abs().max()}"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_matches_the_torch_module_in_eval_mode(variant, backend):
    name, module, _, dst = variant
    _, _, arch, size = VARIANTS[name]
    m = aigc_rt.load(dst, backend=backend)
    x = _inputs(arch, size)
    with torch.no_grad():
        want, got = module(x[:, :, None, None] if arch == "dcgan" else x), m(x)  # a discriminator's m(x) is score
    assert got.shape == want.shape and got.dtype == torch.float32
    assert want.std() > 1e-3, "degenerate reference output: the comparison would prove little"
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {(got - want).abs().max():.3g}"


@pytest.mark.parametrize("variant", ["seed32_d", "tutorial64_d"], indirect=True)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_discriminator_logits_and_the_gan_objective(variant, backend):
    """logits(x): the module's output before its Sigmoid (fp32, atol 1e-4), sigmoid(logits) == score. objective:
    V(D, G) = E[log D(x)] + E[log(1 - D(G(z)))], i.e. minus the seed system's discriminator loss (nn.BCELoss with
    real label 1 and fake label 0, each batch averaged, summed; atol 1e-5), and still finite and exact (from
    logits) where D(x) rounds to 0 or 1 in fp32 and nn.BCELoss clamps the log at -100."""
    name, module, _, dst = variant
    _, _, arch, size = VARIANTS[name]
    d = aigc_rt.load(dst, backend=backend)
    real, fake = _inputs(arch, size, n=5), _inputs(arch, size, n=3) * 0.5
    with torch.no_grad():
        want = module.main[:-1](real).reshape(-1)  # without the Sigmoid
        got = d.logits(real)
        assert got.shape == want.shape == (5,) and got.dtype == torch.float32
        assert want.std() > 1e-3, "degenerate reference output: the comparison would prove little"
        assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {(got - want).abs().max():.3g}"
        assert torch.allclose(torch.sigmoid(got), d.score(real), atol=1e-6)
        bce = nn.BCELoss()
        loss_d = bce(module(real), torch.ones(5)) + bce(module(fake), torch.zeros(3))
        v = d.objective(real, fake)
        assert isinstance(v, float) and abs(v + loss_d.item()) < 1e-5, f"V {v} vs -errD {-loss_d.item()}"
        # a discriminator sure of its answers (the last layer scaled by +-1e4): D rounds to 0 or 1 in fp32, where
        # log D or log(1 - D) of the probabilities is -inf (nn.BCELoss: -100)
        for factor in (1e4, -1e4):
            d.layers[-1] = (d.backend.prepare_conv2d(*_last_layer_scaled(dst, factor), *_last_conv(module)),
                            "sigmoid")
            l_real, l_fake = d.logits(real), d.logits(fake)
            assert (l_real.abs() > 100).any() and (l_fake.abs() > 100).any(), "logits too small to prove much"
            want_v = (F.logsigmoid(l_real).mean() + F.logsigmoid(-l_fake).mean()).item()
            v = d.objective(real, fake)
            assert np.isfinite(v) and abs(v - want_v) <= 1e-6 * abs(want_v), f"V {v} vs {want_v}"


def _last_layer_scaled(path, factor: float):
    """The runtime file's last conv weight and bias, times factor."""
    rf = fmt.read(path, archs.expected)
    last = len(rf.config["layers"]) - 1
    return rf.tensors[f"layers.{last}.weight"] * factor, rf.tensors[f"layers.{last}.bias"] * factor


def _last_conv(module: nn.Module):
    """(stride, padding) of the module's last conv."""
    conv = [m for m in module.main if isinstance(m, nn.Conv2d)][-1]
    return conv.stride[0], conv.padding[0]


def test_logits_need_a_sigmoid(seed_gan, tmp_path):
    _, _, _, d_file = seed_gan
    d = aigc_rt.load(d_file, backend="cpu")
    d.layers[-1] = (d.layers[-1][0], "none")
    with pytest.raises(ValueError, match="ends in 'none', not a sigmoid: it has no logits"):
        d.logits(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"images must have shape \(n, 3, 32, 32\)"):
        aigc_rt.load(d_file, backend="cpu").objective(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 16, 16))


def _inputs(arch: str, size: int, n: int = 3):
    """n latents (n, 100) for a generator, n images (n, 3, size, size) in [-1, 1] for a discriminator."""
    g = torch.Generator().manual_seed(7)
    if arch == "dcgan":
        return torch.randn(n, 100, generator=g)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bf16_files(variant, backend, tmp_path):
    """dtype="bf16": the folded weights rounded to bf16 (biases fp32), half the file. Every layer multiplies them
    with its input rounded to bf16 and sums the exact products in fp32 (one layer: the same numbers as the torch
    backend to fp32 tolerances, tests/test_cpu_conv.py). Over 4-5 layers a last-bit difference in one layer's fp32
    sums can round the next layer's input to the neighbouring bf16 value (2^-8 relative), so whole models agree
    with the torch backend to atol 1e-2, and with the fp32 module to atol 0.05."""
    name, module, src, dst = variant
    _, _, arch, size = VARIANTS[name]
    bf16 = aigc_rt.convert(src, tmp_path / "bf16.safetensors", dtype="bf16")
    assert os.path.getsize(bf16) < 0.55 * os.path.getsize(dst)
    info = fmt.read(bf16, archs.expected)
    assert info.dtype == "bf16"
    assert all(t.dtype == (torch.bfloat16 if k.endswith("weight") else torch.float32) for k, t in info.tensors.items())
    x = _inputs(arch, size)
    want = aigc_rt.load(bf16, backend="torch")(x)  # a discriminator's __call__ is score
    m = aigc_rt.load(bf16, backend=backend)
    got = m(x)
    assert got.dtype == torch.float32
    assert m.out_bf16 == [True] * (len(m.layers) - 1) + [False]
    m.out_bf16 = [False] * len(m.layers)  # every layer hands on fp32 and the next one rounds it: the same bits
    assert torch.equal(m(x), got), "handing on bf16 outputs (out_bf16) changed the result"
    assert torch.allclose(got, want, atol=1e-2), f"vs the torch backend: {(got - want).abs().max():.3g}"
    with torch.no_grad():
        fp32 = module(x[:, :, None, None] if arch == "dcgan" else x).reshape(got.shape)
    assert torch.allclose(got, fp32, atol=0.05), f"vs the fp32 module: {(got - fp32).abs().max():.3g}"
    assert not torch.allclose(got, fp32, atol=1e-6), "bf16 weights left the output unchanged: not rounded?"


def test_forced_arch(seed_gan, tmp_path):
    g_module, g_file, _, _ = seed_gan
    src = tmp_path / "g.pt"
    torch.save(g_module.state_dict(), src)
    assert fmt.read(aigc_rt.convert(src, tmp_path / "a.safetensors", arch="dcgan32"), archs.expected).arch == "dcgan"
    with pytest.raises(aigc_rt.FormatError, match="expects a 64x64 generator, but its 4 layers make a 32x32 one"):
        aigc_rt.convert(src, tmp_path / "b.safetensors", arch="dcgan64")
    with pytest.raises(aigc_rt.FormatError, match="do not chain as a DCGAN discriminator"):
        aigc_rt.convert(src, tmp_path / "c.safetensors", arch="dcgan_d")
    with pytest.raises(ValueError, match="fp32 or bf16 weights; dtype='int8' is not supported"):
        aigc_rt.convert(src, tmp_path / "d.safetensors", dtype="int8")


def test_cli_convert_arch(tmp_path, capsys):
    """`aigc-rt convert netG.pth out.safetensors --arch dcgan64` on a 64x64 tutorial state_dict writes the same
    file as reading the arch from the shapes, and the model matches the torch module (fp32, atol 1e-4); a wrong
    forced arch exits 2 naming the mismatch and writes nothing."""
    torch.manual_seed(11)
    module = randomize_batchnorm(tutorial_generator(ngf=8), seed=12)  # 5 layers: 64x64, small and fast
    src = tmp_path / "netG.pth"
    torch.save(module.state_dict(), src)
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(out), "--arch", "dcgan64"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    rf, auto = fmt.read(out, archs.expected), fmt.read(aigc_rt.convert(src, tmp_path / "auto.safetensors"),
                                                       archs.expected)
    assert rf.arch == "dcgan" and rf.config == auto.config and rf.config["image_size"] == 64
    assert rf.tensors.keys() == auto.tensors.keys() and all(torch.equal(rf.tensors[k], auto.tensors[k])
                                                            for k in rf.tensors)
    z = torch.randn(2, 100, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        want, got = module(z[:, :, None, None]), aigc_rt.load(out, backend="cpu")(z)
    assert got.shape == want.shape == (2, 3, 64, 64) and want.std() > 1e-3
    assert torch.allclose(got, want, atol=ATOL, rtol=RTOL), f"max abs err {(got - want).abs().max():.3g}"

    for arch, message in [
        ("dcgan32", f"{src}: arch 'dcgan32' expects a 32x32 generator, but its 5 layers make a 64x64 one"),
        ("dcgan64_d", "do not chain as a DCGAN discriminator"),
        ("dcgan128", "unknown arch 'dcgan128'"),
    ]:
        bad = tmp_path / f"{arch}.safetensors"
        assert main(["convert", str(src), str(bad), "--arch", arch]) == 2, arch
        captured = capsys.readouterr()
        assert message in captured.err and not captured.out, (arch, captured.err)
        assert not bad.exists(), f"--arch {arch}: a file was written despite the error"


def test_generate_is_seeded_and_backend_independent(seed_gan):
    _, g_file, _, _ = seed_gan
    gens = {be: aigc_rt.load(g_file, backend=be) for be in ("torch", "cpu")}
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(3))
    for be, g in gens.items():
        images = g.generate(4, seed=3)
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and images.is_contiguous()
        assert images.abs().max() <= 1
        assert torch.equal(images, g(z)), be  # documented: z = torch.randn(n, nz, generator=...manual_seed(seed))
        assert torch.equal(g(z), g(z[:, :, None, None]))
        assert not torch.allclose(images, g.generate(4, seed=4))
    cpu, ref = gens["cpu"].generate(4, seed=3), gens["torch"].generate(4, seed=3)
    assert torch.allclose(cpu, ref, atol=ATOL), f"max abs err {(cpu - ref).abs().max():.3g}"


def test_results_the_caller_holds_are_never_overwritten(seed_gan):
    """The cpu backend recycles its output buffers: a later call must not touch a result the caller still holds."""
    _, g_file, _, _ = seed_gan
    g, ref = aigc_rt.load(g_file, backend="cpu"), aigc_rt.load(g_file, backend="torch")
    z = torch.randn(2, 3, 100, generator=torch.Generator().manual_seed(4))
    first = g(z[0])
    snapshot = first.clone()
    second = g(z[1])
    assert torch.equal(first, snapshot) and not torch.allclose(first, second)
    for got, want in ((first, ref(z[0])), (second, ref(z[1]))):
        assert torch.allclose(got, want, atol=ATOL), f"max abs err {(got - want).abs().max():.3g}"
    del first, snapshot
    third = g(z[0])  # may reuse the dropped result's buffer
    assert torch.allclose(third, ref(z[0]), atol=ATOL) and torch.allclose(second, ref(z[1]), atol=ATOL)


def test_save_grid_layout(tmp_path):
    """torchvision's make_grid layout: nrow columns, 2 px black padding around and between images; [-1, 1] ->
    round((x + 1) / 2 * 255). Checked on known pixels."""
    n, h, w = 5, 4, 6
    images = torch.full((n, 3, h, w), -1.0)
    for k in range(n):
        images[k, 0] = k / 4 * 2 - 1  # red channel: image k's own level
        images[k, 1, 0, 0] = 1.0  # its top-left pixel has full green
    images[4, 2] = 0.0  # mid grey blue in the last image
    path = aigc_rt.save_grid(images, tmp_path / "grid.png", nrow=3)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * (h + 2) + 2, 3 * (w + 2) + 2, 3)
    for k in range(n):
        top, left = 2 + (k // 3) * (h + 2), 2 + (k % 3) * (w + 2)
        assert (grid[top:top + h, left:left + w, 0] == round(k / 4 * 255)).all()
        assert grid[top, left, 1] == 255 and grid[top + 1, left, 1] == 0
    assert grid[2 + (h + 2), 2 + (w + 2) + 1, 2] == 128  # image 4 (row 1, col 1), blue 0.0 -> 128
    assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all() and (grid[2 + h:4 + h] == 0).all()
    assert (grid[8:, 2 + 2 * (w + 2):] == 0).all()  # the empty sixth cell
    grey = aigc_rt.save_grid(torch.zeros(1, 1, 3, 3), tmp_path / "grey.png")  # one channel -> RGB greys
    assert (np.asarray(Image.open(grey))[2:5, 2:5] == 128).all()


def test_cli_imagine_and_score(seed_gan, tmp_path, capsys):
    _, g_file, _, d_file = seed_gan
    out = tmp_path / "grid.png"
    assert main(["imagine", "--model", str(g_file), "-n", "5", "--seed", "2", "-o", str(out), "--nrow", "4"]) == 0
    assert "images/s" in capsys.readouterr().out
    want = tmp_path / "want.png"
    aigc_rt.save_grid(aigc_rt.load(g_file).generate(5, seed=2), want, nrow=4)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(want)))

    grid = np.asarray(Image.open(out))  # cut the images back out of the grid and score them
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"img{k}.png")
        Image.fromarray(grid[2:34, 2 + k * 34:34 + k * 34]).save(paths[-1])
    assert main(["score", *map(str, paths), "--model", str(d_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    pixels = torch.tensor(np.stack([np.asarray(Image.open(p)) for p in paths]), dtype=torch.float32)
    want = aigc_rt.load(d_file).score(pixels.permute(0, 3, 1, 2) / 127.5 - 1)
    assert [line.split("\t")[1] for line in lines] == list(map(str, paths))
    assert [float(line.split("\t")[0]) for line in lines] == pytest.approx(want.tolist(), abs=1e-4)


def test_bad_input(seed_gan, tmp_path):
    _, g_file, _, d_file = seed_gan
    g, d = aigc_rt.load(g_file), aigc_rt.load(d_file)
    nan = torch.zeros(2, 100)
    nan[1, 3] = float("nan")
    cases = [
        (lambda: g(torch.randn(2, 99)), ValueError, r"shape \(n, 100\) or \(n, 100, 1, 1\), got \(2, 99\)"),
        (lambda: g(torch.randn(2, 100, 2, 2)), ValueError, r"got \(2, 100, 2, 2\)"),
        (lambda: g(torch.randn(100)), ValueError, r"got \(100,\)"),
        (lambda: g(torch.randn(0, 100)), ValueError, "no samples"),
        (lambda: g(nan), ValueError, "NaN or infinite"),
        (lambda: g(torch.full((1, 100), float("inf"))), ValueError, "NaN or infinite"),
        (lambda: g(torch.zeros(2, 100, dtype=torch.long)), ValueError, "floating-point"),
        (lambda: g([[0.0] * 100]), ValueError, "must be a torch.Tensor"),
        (lambda: g.generate(0), ValueError, "n must be an integer >= 1, got 0"),
        (lambda: g.generate(-3), ValueError, "n must be an integer >= 1"),
        (lambda: g.generate(2.5), ValueError, "n must be an integer >= 1"),
        (lambda: g.generate(True), ValueError, "n must be an integer >= 1"),
        (lambda: g.generate(2, seed="x"), ValueError, "seed must be an integer"),
        (lambda: d.score(torch.zeros(2, 3, 31, 32)), ValueError, r"shape \(n, 3, 32, 32\)"),
        (lambda: d.score(torch.full((1, 3, 32, 32), float("nan"))), ValueError, "NaN or infinite"),
        (lambda: aigc_rt.save_grid(torch.zeros(1, 3, 4, 4), tmp_path / "no" / "such" / "g.png"), FileNotFoundError,
         "no.such.g.png.*does not exist"),
        (lambda: aigc_rt.save_grid(torch.zeros(1, 3, 4, 4), tmp_path), IsADirectoryError, "is a directory"),
        (lambda: aigc_rt.save_grid(torch.zeros(1, 3, 4, 4), tmp_path / "g.nope"), ValueError, "g.nope"),
        (lambda: aigc_rt.save_grid(torch.zeros(2, 2, 4, 4), tmp_path / "g.png"), ValueError, "C in"),
        (lambda: aigc_rt.save_grid(torch.zeros(1, 3, 4, 4), tmp_path / "g.png", nrow=0), ValueError, "nrow"),
        (lambda: aigc_rt.save_grid(torch.full((1, 3, 4, 4), float("nan")), tmp_path / "g.png"), ValueError, "NaN"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_cli_validate(variant, backend, tmp_path, capsys):
    """`aigc-rt validate` PASSes a file against its own checkpoint and FAILs it against another one."""
    name, module, src, dst = variant
    assert main(["validate", str(dst), "--reference", src, "--backend", backend]) == 0
    assert "PASS" in capsys.readouterr().out
    with torch.no_grad():
        next(module.parameters()).mul_(1.01)  # restored below: the module is shared by the module's tests
    other = save_checkpoint(module, VARIANTS[name][1], tmp_path)
    with torch.no_grad():
        next(module.parameters()).div_(1.01)
    assert main(["validate", str(dst), "--reference", other, "--backend", backend]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_cli_errors_exit_2(seed_gan, tmp_path, capsys):
    _, g_file, _, d_file = seed_gan
    assert main(["imagine", "--model", str(g_file), "-o", str(tmp_path / "missing" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["imagine", "--model", str(d_file)]) == 2
    assert "needs a dcgan or vae one" in capsys.readouterr().err
    assert main(["imagine", "--model", str(g_file), "-n", "0", "-o", str(tmp_path / "x.png")]) == 2
    assert "n must be an integer >= 1" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "nothing.png"), "--model", str(d_file)]) == 2
    assert "nothing.png" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    assert main(["score", str(tmp_path / "small.png"), "--model", str(d_file)]) == 2
    assert "8x8 pixels; the discriminator takes 32x32" in capsys.readouterr().err


def _unwritable_folder(tmp_path):
    """A folder this process cannot create files in, root included (root ignores permission bits): a chmod 555
    one where that binds, else a pseudo-filesystem folder (/sys, /proc) that refuses new files."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    for candidate in ("/sys", "/proc"):
        try:
            fd = os.open(os.path.join(candidate, "aigc_rt_probe.png"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except OSError:
            return candidate
        os.close(fd)  # it could be written after all: not an unwritable folder
        os.unlink(os.path.join(candidate, "aigc_rt_probe.png"))
    pytest.skip("no folder this process cannot write to")


def test_unwritable_output_path(seed_gan, tmp_path, capsys):
    """save_grid and `aigc-rt imagine -o` into a folder no one can write (a regular FILE's "folder", which stops
    root too) or a read-only one: an OSError naming the path (exit 2 on the CLI), and no file left behind."""
    import re
    _, g_file, _, _ = seed_gan
    images = torch.zeros(1, 3, 4, 4)
    some_file = tmp_path / "some_file"
    some_file.write_bytes(b"not a folder")
    under_file = some_file / "grid.png"
    with pytest.raises(NotADirectoryError, match=re.escape(str(under_file)) + ".*is a file, not a folder"):
        aigc_rt.save_grid(images, under_file)
    assert main(["imagine", "--model", str(g_file), "-n", "1", "-o", str(under_file)]) == 2
    assert f"{under_file}" in capsys.readouterr().err and some_file.read_bytes() == b"not a folder"

    folder = _unwritable_folder(tmp_path)
    try:
        path = os.path.join(folder, "grid.png")
        with pytest.raises(OSError, match=re.escape(path)):
            aigc_rt.save_grid(images, path)
        assert main(["imagine", "--model", str(g_file), "-n", "1", "-o", path]) == 2
        assert path in capsys.readouterr().err and not os.path.exists(path)
    finally:
        if str(folder).startswith(str(tmp_path)):
            os.chmod(folder, 0o755)


def _converted_error(sd, tmp_path, name="x.pt"):
    path = tmp_path / name
    torch.save(sd, path)
    with pytest.raises(aigc_rt.FormatError) as e:
        aigc_rt.convert(path, tmp_path / "out.safetensors")
    return str(e.value)


def test_converter_rejects_bad_checkpoints(seed_gan, tmp_path):
    g_module = seed_gan[0]
    sd = g_module.state_dict()
    assert "lacks ['running_mean', 'running_var']" in _converted_error(
        {k: v for k, v in sd.items() if "running" not in k}, tmp_path)
    assert "unexpected tensor 'main.0.scale'" in _converted_error({**sd, "main.0.scale": torch.ones(3)}, tmp_path)
    assert "several prefixes" in _converted_error({**sd, "head.0.weight": torch.ones(3, 3, 4, 4)}, tmp_path)
    small = nn.Sequential(nn.ConvTranspose2d(8, 4, 3, 1, 0, bias=False), nn.ConvTranspose2d(4, 3, 3, 2, 1))
    assert "3x3 kernel" in _converted_error(small.state_dict(), tmp_path)
    assert "weights_only" in _converted_error(tutorial_generator(ngf=2), tmp_path)  # a pickled module
    assert "do not chain" in _converted_error({"main.0.weight": torch.ones(5, 6, 4, 4),
                                               "main.3.weight": torch.ones(7, 8, 4, 4)}, tmp_path)
    # a runtime file is not a checkpoint: it is written again, in the dtype asked for (here the same one)
    again = aigc_rt.load(aigc_rt.convert(seed_gan[1], tmp_path / "again.safetensors"))
    assert torch.equal(again.generate(2, seed=0), aigc_rt.load(seed_gan[1]).generate(2, seed=0))


def test_runtime_file_with_inconsistent_config_is_rejected(seed_gan, tmp_path):
    import json
    from safetensors import safe_open
    with safe_open(str(seed_gan[1]), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    config = json.loads(meta["config"])
    config["layers"][2]["c_in"] = 100  # no longer chains with layer 1
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(aigc_rt.FormatError, match="layer 2 takes 100 channels but layer 1 gives 128"):
        aigc_rt.load(tmp_path / "bad.safetensors")
    config["layers"][2]["c_in"], config["image_size"] = 128, 64
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(aigc_rt.FormatError, match="into 32x32 images, not image_size=64"):
        aigc_rt.load(tmp_path / "bad.safetensors")


def test_bench_cli_times_image_models(capsys):
    """`aigc-rt bench --model` on a generator and a discriminator prints images/s rows, and the GFLOP count it
    derives from the runtime config equals the one counted on the torch modules."""
    from aigc_rt.bench_images import gflop_per_image
    from dcgan_reference import gflop_per_image as module_gflop
    for name, module in (("dcgan-digits", seed_generator()), ("dcgan-digits-d", seed_discriminator())):
        assert gflop_per_image(aigc_rt.load(name).config) == pytest.approx(module_gflop(module), rel=1e-12)
    for name, arch in (("dcgan-digits", "dcgan"), ("dcgan-digits-d", "dcgan_d")):
        assert main(["bench", "--model", name, "--batches", "1,3"]) == 0
        rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith(f"| {name} |")]
        assert [r.split("|")[2:4] for r in rows] == [[f" {arch} ", " 1 "], [f" {arch} ", " 3 "]], rows
        assert all(float(r.split("|")[5]) > 0 for r in rows), rows  # images/s
