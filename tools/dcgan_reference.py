"""The PyTorch DCGANs aigc_rt runs (../shared/SEED_SYSTEMS.md), as plain nn.Modules whose state_dict keys are
`main.N`: the 32x32 seed generator and discriminator (bias=False everywhere) and the 64x64 ones of the PyTorch
DCGAN tutorial. The references for tools/train_gan.py, the tests and the benchmarks."""
from __future__ import annotations

import torch
from torch import nn

NZ = 100


class DCGAN(nn.Module):
    """`main` (an nn.Sequential); a discriminator flattens its (N, 1, 1, 1) probabilities to (N,)."""

    def __init__(self, *layers: nn.Module, flatten: bool = False):
        super().__init__()
        self.main, self.flatten = nn.Sequential(*layers), flatten

    def forward(self, x):
        y = self.main(x)
        return y.view(-1) if self.flatten else y


def seed_generator() -> DCGAN:
    return DCGAN(
        nn.ConvTranspose2d(NZ, 256, 4, 1, 0, bias=False), nn.BatchNorm2d(256), nn.ReLU(True),
        nn.ConvTranspose2d(256, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(True),
        nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True),
        nn.ConvTranspose2d(64, 3, 4, 2, 1, bias=False), nn.Tanh())


def seed_discriminator() -> DCGAN:
    return DCGAN(
        nn.Conv2d(3, 64, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(64, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(128, 256, 4, 2, 1, bias=False), nn.BatchNorm2d(256), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(256, 1, 4, 1, 0, bias=False), nn.Sigmoid(), flatten=True)


def tutorial_generator(nz: int = NZ, ngf: int = 64) -> DCGAN:
    layers, ch = [], [nz, ngf * 8, ngf * 4, ngf * 2, ngf]
    for i, (a, b) in enumerate(zip(ch, ch[1:])):
        layers += [nn.ConvTranspose2d(a, b, 4, 1 if i == 0 else 2, 0 if i == 0 else 1, bias=False), nn.BatchNorm2d(b),
                   nn.ReLU(True)]
    return DCGAN(*layers, nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False), nn.Tanh())


def tutorial_discriminator(ndf: int = 64) -> DCGAN:
    layers, ch = [nn.Conv2d(3, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)], [ndf, ndf * 2, ndf * 4, ndf * 8]
    for a, b in zip(ch, ch[1:]):
        layers += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, True)]
    return DCGAN(*layers, nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid(), flatten=True)


def randomize_batchnorm(module: DCGAN, seed: int) -> DCGAN:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding them matters, yet of the scale
    of the activations, so that the output still depends on the input: the running statistics of one batch of
    random inputs, then the means shifted by ~0.3 std, the variances scaled by 0.5-2, gamma ~ 1 +- 0.3 and
    beta ~ +-0.3. Returns the module in eval mode."""
    g = torch.Generator().manual_seed(seed)
    convs = [m for m in module.main if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    if isinstance(convs[0], nn.ConvTranspose2d):
        example = torch.randn(64, convs[0].in_channels, 1, 1, generator=g)
    else:
        size = 4 * 2 ** (len(convs) - 1)
        example = torch.rand(64, convs[0].in_channels, size, size, generator=g) * 2 - 1
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # the running statistics of this one batch
    with torch.no_grad():
        module.train()(example)
        for m in bns:
            m.momentum = 0.1
            n = m.num_features
            m.running_mean.add_(torch.randn(n, generator=g) * 0.3 * m.running_var.sqrt())
            m.running_var.mul_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.copy_(1 + torch.randn(n, generator=g) * 0.3)
            m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return module.eval()


def gflop_per_image(module: DCGAN) -> float:
    """Multiply-adds x 2 of a generator's transposed convs (each input pixel times the whole kernel) or a
    discriminator's convs (each output pixel times the whole kernel)."""
    convs = [m for m in module.main if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    transposed = isinstance(convs[0], nn.ConvTranspose2d)
    flops, size = 0, 1 if transposed else 4 * 2 ** (len(convs) - 1)  # a z vector / the image
    for m in convs:
        k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
        if transposed:
            flops += 2 * m.in_channels * m.out_channels * k * k * size * size
            size = (size - 1) * s - 2 * p + k + m.output_padding[0]
        else:
            size = (size + 2 * p - k) // s + 1
            flops += 2 * m.in_channels * m.out_channels * k * k * size * size
    return flops / 1e9
