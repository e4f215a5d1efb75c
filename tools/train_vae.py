"""Train the embedded default VAE: PyTorch's examples/vae (fc1, fc21 / fc22, fc3, fc4; ReLU; Bernoulli decoder;
its loss_function, BCE summed + KLD) at 784 -> 128 -> 16 -> 128 -> 784 on scikit-learn's digits.

Data: the 1,797 bundled 8x8 digits, upsampled (bilinear) to 28x28, MNIST's size, grey values in [0, 1] (as the
example feeds MNIST's greys to its Bernoulli likelihood); every 10th image held out (180). Training: Adam(1e-3),
batch 128, --epochs passes, torch.manual_seed(0). Quality, on the held-out digits: the ELBO (a lower bound of log
p(x)) against the exact log-likelihood of the best model without a latent, independent Bernoulli pixels with the
training set's means (`pixel_baseline`); tests/test_default_models.py measures both again through the runtime.
The module is saved (.pt) and converted with aigc_rt's converter to aigc_rt/data/vae-digits.safetensors (bf16
weights: the data budget).

    python tools/train_vae.py --out build/train_vae [--epochs 400]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from vae_reference import ExamplesVAE, loss_function

DATA = os.path.join(os.path.dirname(__file__), "..", "aigc_rt", "data")
D, HIDDEN, LATENT = 28 * 28, 128, 16


def digits_28() -> tuple[torch.Tensor, torch.Tensor]:
    """-> (training images, held-out images), each (N, 1, 28, 28) in [0, 1]; held out: every 10th digit."""
    from sklearn.datasets import load_digits
    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    held = torch.arange(len(x)) % 10 == 0
    return x[~held], x[held]


def pixel_baseline(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """log p(x) (N,) of each test image under independent Bernoulli pixels with the training means (clamped to
    [1e-4, 1 - 1e-4]): the best model without a latent, exact rather than a bound."""
    p = train.reshape(len(train), -1).mean(0).clamp(1e-4, 1 - 1e-4)
    return -F.binary_cross_entropy(p.expand(len(test), -1), test.reshape(len(test), -1), reduction="none").sum(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join("build", "train_vae"))
    ap.add_argument("--epochs", type=int, default=400)
    a = ap.parse_args()
    torch.manual_seed(0)
    train, test = digits_28()
    model = ExamplesVAE(D, HIDDEN, LATENT)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.time()
    for epoch in range(a.epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(train)).split(128):
            recon, mu, logvar = model(train[idx])
            loss = loss_function(recon, train[idx], mu, logvar)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        if (epoch + 1) % 50 == 0:
            print(f"epoch {epoch + 1}: training loss {total / len(train):.2f} nats/image ({time.time() - t0:.0f} s)")
    model.eval()
    os.makedirs(a.out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(a.out, "vae.pt"))
    import aigc_rt
    dst = aigc_rt.convert(os.path.join(a.out, "vae.pt"), os.path.join(DATA, "vae-digits.safetensors"), dtype="bf16")
    elbo = aigc_rt.load(dst, backend="cpu").elbo(test, samples=16, seed=0)
    print(f"held-out ({len(test)} digits): ELBO {elbo.mean():.1f} nats/image (runtime, bf16), independent-pixel "
          f"baseline log p(x) {pixel_baseline(train, test).mean():.1f}; wrote {dst} ({os.path.getsize(dst) / 1e6:.2f} "
          f"MB)")


if __name__ == "__main__":
    main()
