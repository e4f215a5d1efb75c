"""PyTorch's examples/vae (examples/vae/main.py: Kingma & Welling's MLP VAE on MNIST), the reference that
tests/test_vae.py, bench/bench_vae.py and tools/train_vae.py share: its module at any sizes (784, 400, 20 there) and
its loss_function."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExamplesVAE(nn.Module):
    """examples/vae's VAE, verbatim but for the sizes and an optional eps (given, every system sees the same
    draws; None, the example's torch.randn_like)."""

    def __init__(self, d: int = 784, h: int = 400, latent: int = 20):
        super().__init__()
        self.d = d
        self.fc1 = nn.Linear(d, h)
        self.fc21 = nn.Linear(h, latent)
        self.fc22 = nn.Linear(h, latent)
        self.fc3 = nn.Linear(latent, h)
        self.fc4 = nn.Linear(h, d)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar, eps=None):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std) if eps is None else eps
        return mu + eps * std

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))

    def forward(self, x, eps=None):
        mu, logvar = self.encode(x.view(-1, self.d))
        z = self.reparameterize(mu, logvar, eps)
        return self.decode(z), mu, logvar


def loss_function(recon_x, x, mu, logvar, reduction: str = "sum"):
    """examples/vae's loss, BCE summed over the pixels + KLD: summed over the batch as the example trains with it
    (reduction "sum"), or per image (N,) (reduction "none")."""
    per_image = reduction == "none"
    bce = F.binary_cross_entropy(recon_x, x.view(-1, recon_x.shape[1]), reduction=reduction)
    bce = bce.sum(1) if per_image else bce
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), **({"dim": 1} if per_image else {}))
    return bce + kld
