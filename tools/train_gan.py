"""Train the embedded default image model: the 32x32 DCGAN of SEED_SYSTEMS.md on scikit-learn's digits.

Data: the 1,797 8x8 digit images bundled with scikit-learn, upsampled (bilinear) to 32x32, grey copied to
RGB, scaled to [-1, 1]. Model and training exactly as the seed system: Generator and Discriminator
Sequentials with bias=False, BCE loss, Adam(2e-4, betas (0.5, 0.999)), real label 1 / fake label 0.
Saves both state_dicts (.pt) and converts them with aigc_rt's converter to
aigc_rt/data/dcgan-digits.safetensors (generator) and dcgan-digits-d.safetensors (discriminator).

    python tools/train_gan.py --out build/train_gan [--max-minutes 18] [--max-steps 6000]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

NZ = 100
DATA = os.path.join(os.path.dirname(__file__), "..", "aigc_rt", "data")


def generator() -> nn.Module:
    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(
                nn.ConvTranspose2d(NZ, 256, 4, 1, 0, bias=False), nn.BatchNorm2d(256), nn.ReLU(True),
                nn.ConvTranspose2d(256, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(True),
                nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(True),
                nn.ConvTranspose2d(64, 3, 4, 2, 1, bias=False), nn.Tanh())

        def forward(self, z):
            return self.main(z)
    return Generator()


def discriminator() -> nn.Module:
    class Discriminator(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(
                nn.Conv2d(3, 64, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(64, 128, 4, 2, 1, bias=False), nn.BatchNorm2d(128), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(128, 256, 4, 2, 1, bias=False), nn.BatchNorm2d(256), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(256, 1, 4, 1, 0, bias=False), nn.Sigmoid())

        def forward(self, x):
            return self.main(x).view(-1)
    return Discriminator()


def digits_32() -> tuple[torch.Tensor, torch.Tensor]:
    """-> images (N, 3, 32, 32) in [-1, 1], labels (N,)"""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1).expand(-1, 3, -1, -1).contiguous(), torch.tensor(d.target)


def init_weights(m: nn.Module) -> None:
    """The DCGAN paper's init: conv weights N(0, 0.02), BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/train_gan")
    ap.add_argument("--max-minutes", type=float, default=18.0)
    ap.add_argument("--max-steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    real, _ = digits_32()
    G, D = generator(), discriminator()
    G.apply(init_weights)
    D.apply(init_weights)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCELoss()
    ones, zeros = torch.ones(args.batch), torch.zeros(args.batch)
    t0, step = time.time(), 0
    while step < args.max_steps and time.time() - t0 < args.max_minutes * 60:
        x = real[torch.randint(0, len(real), (args.batch,))]
        fake = G(torch.randn(args.batch, NZ, 1, 1))
        # discriminator: real -> 1, fake -> 0
        loss_d = bce(D(x), ones) + bce(D(fake.detach()), zeros)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # generator: make D say 1 on fakes
        loss_g = bce(D(fake), ones)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        step += 1
        if step % 200 == 0:
            print(f"step {step} loss_d {loss_d.item():.3f} loss_g {loss_g.item():.3f} "
                  f"{(time.time() - t0) / 60:.1f} min", flush=True)
    minutes = (time.time() - t0) / 60
    print(f"trained {step} steps in {minutes:.1f} min", flush=True)

    os.makedirs(args.out, exist_ok=True)
    G.eval(), D.eval()
    g_pt, d_pt = os.path.join(args.out, "generator.pt"), os.path.join(args.out, "discriminator.pt")
    torch.save(G.state_dict(), g_pt)
    torch.save(D.state_dict(), d_pt)
    import aigc_rt
    aigc_rt.convert(g_pt, os.path.join(DATA, "dcgan-digits.safetensors"), arch="dcgan")
    aigc_rt.convert(d_pt, os.path.join(DATA, "dcgan-digits-d.safetensors"), arch="dcgan_d")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"steps": step, "train_minutes": round(minutes, 1), "batch": args.batch}, f, indent=2)
    print("wrote aigc_rt/data/dcgan-digits.safetensors and dcgan-digits-d.safetensors")


if __name__ == "__main__":
    main()
