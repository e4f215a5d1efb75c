"""Train the embedded default image model: the 32x32 DCGAN of SEED_SYSTEMS.md on scikit-learn's digits.

Data: the 1,797 8x8 digit images bundled with scikit-learn, upsampled (bilinear) to 32x32, grey copied to
RGB, scaled to [-1, 1]. Model and training as the seed system (tools/dcgan_reference.py): Generator and
Discriminator Sequentials with bias=False, BCE loss, Adam(2e-4, betas (0.5, 0.999)), batch 64, real label 1 /
fake label 0, real and fake images in separate discriminator batches. Three additions, each measured:
- bf16 autocast for the convs (fp32 weights, Adam state and loss; the discriminator's last conv and sigmoid
  in fp32) with channels_last tensors: ~3x the steps in the time budget (--precision fp32 turns it off; per
  step, fp32 scored the same).
- DiffAugment's translation of every discriminator input, real and fake, by up to 4 pixels with background
  shifted in (--translate). Without it the discriminator, whose BatchNorm normalises each batch on its own,
  does not see a fake batch's global brightness: the generator's backgrounds stayed at -0.8 instead of -1,
  and the digit classifier's score below plateaued at ~0.78 from step ~5,000 on (0.80-0.82 with it).
- G_ema, the running average of G's weights (decay --ema 0.999), as a second candidate (as ProGAN, StyleGAN
  and BigGAN ship); it is not trained itself.
Every --eval-every steps both are checked in eval mode, as the runtime folds BatchNorm, with "standing"
statistics (running mean/var recomputed over 2,048 fresh latents rather than the EMA of a moving G) on 1,024
images from a fixed latent: `digit_quality` (a logistic-regression classifier fitted on the real digits)
gives the fraction it classifies with probability >= 0.8 and how many classes those cover. The best
checkpoint (most confident images among those covering >= --min-classes classes) is kept; its generator and
the discriminator of that step are saved (.pt) and converted with aigc_rt's converter to
aigc_rt/data/dcgan-digits.safetensors and dcgan-digits-d.safetensors. tests/test_default_models.py checks the
shipped generator with the same `digit_quality` (64 images, seed 0) and this classifier frozen
(FrozenClassifier, tests/data/digit_classifier.safetensors, written by --save-classifier).

    python tools/train_gan.py --out build/train_gan [--max-minutes 18] [--max-steps 20000]
    python tools/train_gan.py --save-classifier tests/data/digit_classifier.safetensors
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dcgan_reference import NZ, seed_discriminator, seed_generator

CONFIDENT = 0.8  # a generated image counts when the classifier gives one class at least this probability
DATA = os.path.join(os.path.dirname(__file__), "..", "aigc_rt", "data")


def digits_32() -> tuple[torch.Tensor, torch.Tensor]:
    """-> images (N, 3, 32, 32) in [-1, 1], labels (N,)"""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1).expand(-1, 3, -1, -1).contiguous(), torch.tensor(d.target)


def digit_classifier():
    """Logistic regression on the real digits as the GAN sees them (32x32 grey in [-1, 1]), fitted on a fixed
    80% split; C = 1 has the best held-out log-loss of 0.01, 0.1, 1, 10 (0.216, 0.117, 0.105, 0.152).
    -> (classifier, held-out accuracy, held-out fraction classified with probability >= CONFIDENT)."""
    from sklearn.linear_model import LogisticRegression
    x, y = digits_32()
    features, labels = x[:, 0].reshape(len(x), -1).numpy(), y.numpy()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).numpy()
    train, held_out = order[: len(x) * 4 // 5], order[len(x) * 4 // 5:]
    clf = LogisticRegression(C=1.0, max_iter=1000).fit(features[train], labels[train])
    p = clf.predict_proba(features[held_out])  # (n, 10)
    return clf, float((p.argmax(1) == labels[held_out]).mean()), float((p.max(1) >= CONFIDENT).mean())


class FrozenClassifier:
    """A fitted logistic regression kept as numbers (saved by `--save-classifier`): predict_proba is
    softmax(x W^T + b) in float64, as scikit-learn's multinomial model computes it. The quality test uses the
    frozen one, so its verdict does not hang on how a BLAS build or a scikit-learn release steers the
    iterative fit (refits differ in the 4th decimal of a probability)."""

    def __init__(self, coef, intercept):
        self.coef = np.ascontiguousarray(coef, np.float64)  # (10, F); scikit-learn keeps coef_ in Fortran order
        self.intercept = np.ascontiguousarray(intercept, np.float64)  # (10,)

    def predict_proba(self, features) -> np.ndarray:
        z = np.asarray(features, np.float64) @ self.coef.T + self.intercept  # (N, 10)
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def save(self, path: str) -> None:
        from safetensors.numpy import save_file
        save_file({"coef": self.coef, "intercept": self.intercept}, path)

    @classmethod
    def load(cls, path: str) -> "FrozenClassifier":
        from safetensors.numpy import load_file
        t = load_file(path)
        return cls(t["coef"], t["intercept"])


def digit_features(images: torch.Tensor) -> np.ndarray:
    """images (N, 3, 32, 32) in [-1, 1] -> the classifier's input (N, 1024): grey pixels."""
    return images.float().mean(1).reshape(len(images), -1).numpy()


def digit_quality(clf, images: torch.Tensor) -> dict:
    """images (N, 3, 32, 32) in [-1, 1] -> {"confident": fraction classified with probability >= CONFIDENT,
    "classes": how many of the 10 digits those confident images cover, "counts": per class}."""
    p = clf.predict_proba(digit_features(images))  # (N, 10)
    sure = p.max(1) >= CONFIDENT
    counts = [int(((p.argmax(1) == c) & sure).sum()) for c in range(10)]
    return {"confident": float(sure.mean()), "classes": sum(c > 0 for c in counts), "counts": counts}


def translate(x: torch.Tensor, shift: int) -> torch.Tensor:
    """DiffAugment's translation: each image moved by its own random (dy, dx) in [-shift, shift], background
    (-1) shifted in; differentiable, applied to real and fake images alike before the discriminator."""
    if shift == 0:
        return x
    b, _, h, w = x.shape
    dy, dx = (torch.randint(-shift, shift + 1, (b, 1, 1)) for _ in range(2))
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    rows = torch.arange(h).view(1, h, 1) + dy + shift  # (B, H, 1)
    cols = torch.arange(w).view(1, 1, w) + dx + shift  # (B, 1, W)
    return padded[torch.arange(b).view(b, 1, 1), :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def standing_statistics(G: nn.Module, batches: int = 8, batch: int = 256) -> nn.Module:
    """A copy of G in eval mode whose BatchNorm running statistics are the exact averages over `batches`
    batches of fresh latents (train-mode forward, no gradients), instead of the training EMA of a moving G."""
    g = copy.deepcopy(G).float().train()
    for m in g.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    z = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for _ in range(batches):
            g(torch.randn(batch, NZ, 1, 1, generator=z))
    return g.eval()


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
    ap.add_argument("--max-steps", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="bf16: autocast the convs (fp32 master weights, optimizer and loss): ~3x the steps")
    ap.add_argument("--translate", type=int, default=4, help="DiffAugment translation of D's inputs, pixels")
    ap.add_argument("--ema", type=float, default=0.999, help="decay of the weight average G_ema")
    ap.add_argument("--min-classes", type=int, default=8, help="a kept checkpoint covers at least this many")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the weights' init and the training draws")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--dst-dir", default=DATA, help="where the converted files go (default: aigc_rt/data)")
    ap.add_argument("--save-classifier", metavar="PATH", default=None,
                    help="only fit the digit classifier and save it frozen (tests/data/digit_classifier.safetensors)")
    args = ap.parse_args()
    if args.save_classifier:
        clf, acc, confident = digit_classifier()
        FrozenClassifier(clf.coef_, clf.intercept_).save(args.save_classifier)
        print(f"wrote {args.save_classifier}: held-out accuracy {acc:.3f}, real digits confident {confident:.3f}")
        return
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    real, _ = digits_32()
    clf, clf_acc, clf_confident = digit_classifier()
    print(f"classifier: held-out accuracy {clf_acc:.3f}, real digits confident {clf_confident:.3f}", flush=True)
    z_eval = torch.randn(1024, NZ, 1, 1, generator=torch.Generator().manual_seed(1234))
    checkpoints, best = [], None
    G, D = seed_generator(), seed_discriminator()
    G.apply(init_weights)
    D.apply(init_weights)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCELoss()
    ones, zeros = torch.ones(args.batch), torch.zeros(args.batch)
    bf16 = args.precision == "bf16"
    G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    G_ema = copy.deepcopy(G)  # Polyak average of G's weights, updated after every G step
    real = real.contiguous(memory_format=torch.channels_last)

    def d_prob(x):  # D's forward; its last conv and the sigmoid in fp32, so BCE sees probabilities near 0 and 1
        x = translate(x, args.translate).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h = D.main[:-2](x)
        return D.main[-2:](h.float()).view(-1)

    t0, step = time.time(), 0
    while step < args.max_steps and time.time() - t0 < args.max_minutes * 60:
        x = real[torch.randint(0, len(real), (args.batch,))]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fake = G(torch.randn(args.batch, NZ, 1, 1))
        # discriminator: real -> 1, fake -> 0
        loss_d = bce(d_prob(x), ones) + bce(d_prob(fake.detach()), zeros)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # generator: make D say 1 on fakes
        loss_g = bce(d_prob(fake), ones)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        with torch.no_grad():
            for p_ema, p in zip(G_ema.parameters(), G.parameters()):
                p_ema.lerp_(p, 1 - args.ema)
        step += 1
        if step % args.eval_every == 0:
            minutes = (time.time() - t0) / 60
            print(f"step {step} loss_d {loss_d.item():.3f} loss_g {loss_g.item():.3f} {minutes:.1f} min", flush=True)
            for name, g in (("G", G), ("G_ema", G_ema)):
                g = standing_statistics(g)
                with torch.no_grad():
                    q = digit_quality(clf, g(z_eval))
                checkpoints.append({"step": step, "minutes": round(minutes, 1), "generator": name, **q})
                print(f"  {name:5}: confident {q['confident']:.3f} classes {q['classes']} {q['counts']}", flush=True)
                if q["classes"] >= args.min_classes and (best is None or q["confident"] > best[0]["confident"]):
                    best = (checkpoints[-1], copy.deepcopy(g.state_dict()), copy.deepcopy(D.state_dict()))
    minutes = (time.time() - t0) / 60
    print(f"trained {step} steps in {minutes:.1f} min", flush=True)
    if best is None:
        raise SystemExit("no checkpoint covered --min-classes classes: nothing worth shipping")
    print(f"keeping the checkpoint of step {best[0]['step']}: {best[0]}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    g_pt, d_pt = os.path.join(args.out, "generator.pt"), os.path.join(args.out, "discriminator.pt")
    torch.save(best[1], g_pt)
    torch.save(best[2], d_pt)
    import aigc_rt
    aigc_rt.convert(g_pt, os.path.join(args.dst_dir, "dcgan-digits.safetensors"), arch="dcgan32")
    aigc_rt.convert(d_pt, os.path.join(args.dst_dir, "dcgan-digits-d.safetensors"), arch="dcgan32_d")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"steps": step, "train_minutes": round(minutes, 1), "batch": args.batch, "kept": best[0],
                   "classifier": {"held_out_accuracy": clf_acc, "held_out_confident": clf_confident},
                   "checkpoints": checkpoints}, f, indent=2)
    print(f"wrote {args.dst_dir}/dcgan-digits.safetensors and dcgan-digits-d.safetensors")


if __name__ == "__main__":
    main()
