"""A fully connected variational autoencoder (Kingma & Welling 2013; PyTorch's examples/vae), written once against
a backend's op set; read it top to bottom. x is an image flattened to D = channels * height * width values in
[0, 1] (N rows), z a latent of L dims:

    encode:   h = act(x W^T + b) per encoder layer;   (mu, logvar) = split(h W_head^T + b_head)     (N, L) each
    sample:   z = mu + eps * exp(logvar / 2),  eps ~ N(0, I)                                          (reparameterised)
    decode:   h = act(z W^T + b) per decoder layer;   l = h W_out^T + b_out;   p(x | z) = Bernoulli(sigmoid(l))

ELBO(x) = E_q(z|x)[log p(x | z)] - KL(q(z | x) || N(0, I)), in nats, with
    log p(x | z) = sum_d x_d log sigmoid(l_d) + (1 - x_d) log sigmoid(-l_d)   (from the logits l: exact where
                                                                               sigmoid(l) rounds to 0 or 1)
    KL = -1/2 sum_j (1 + logvar_j - mu_j^2 - exp(logvar_j))                   (closed form: two diagonal Gaussians)
the expectation estimated from `samples` draws of eps. At one sample, -ELBO summed over a batch is examples/vae's
loss_function: binary_cross_entropy(sigmoid(l), x, reduction="sum") + KLD. log_likelihood is the importance-weighted
estimate (IWAE) log 1/K sum_k p(x | z_k) p(z_k) / q(z_k | x), the tighter bound VAE papers report.
The linears (and a relu after them), the reparameterisation and the ELBO's sums run in the backend's ops
(reparameterize, bernoulli_log_likelihood, bernoulli_elbo: csrc/cpu/vae.cpp, kernels/vae.py); the decoder's sigmoid,
a tanh hidden activation and IWAE's Gaussian log-densities are torch ops. Weights: fp32, bf16 (activations rounded
to bf16, fp32 sums) or int8 (weight-only, per-row scales), as every backend.linear takes them; biases fp32.
"""
from __future__ import annotations

import math

import torch

from ..config import VAEConfig
from ..format import SCALE_SUFFIX, TensorSpec, add_matrix
from .inputs import check_count, float_input, seeded_generator

MAX_SAMPLES = 4096  # eps draws per image for the ELBO
CHUNK_LOGITS = 1 << 25  # elbo / log_likelihood decode at most this many logits (128 MB) at once: samples in chunks


def layer_names(c: VAEConfig) -> list[tuple[str, int, int]]:
    """(name, in, out) of every linear, in order: encoder.i, head (-> mu and logvar), decoder.i, out."""
    names, width = [], c.pixels
    for i, w in enumerate(c.encoder):
        names.append((f"encoder.{i}", width, w))
        width = w
    names.append(("head", width, 2 * c.latent))
    width = c.latent
    for i, w in enumerate(c.decoder):
        names.append((f"decoder.{i}", width, w))
        width = w
    names.append(("out", width, c.pixels))
    return names


def expected_tensors(c: VAEConfig, dtype: str) -> TensorSpec:
    """NAME.weight (out, in) in the file's dtype (int8: with a (out,) fp32 NAME.weight_scale beside), NAME.bias
    (out,) fp32, for every linear of layer_names. head.weight is (2L, in): mu's rows, then logvar's."""
    spec = {}
    for name, n_in, n_out in layer_names(c):
        add_matrix(spec, f"{name}.weight", (n_out, n_in), dtype)
        spec[f"{name}.bias"] = ((n_out,), torch.float32)
    return spec


class VAE:
    arch = "vae"

    def __init__(self, config: VAEConfig, tensors: dict[str, torch.Tensor], backend, tokenizer=None,
                 dtype: str = "fp32"):
        self.config, self.backend, self.tokenizer, self.dtype = config, backend, tokenizer, dtype
        self.device = backend.device
        c = config

        def linear(name):
            return backend.prepare_linear(tensors[f"{name}.weight"], tensors[f"{name}.bias"],
                                          tensors.get(f"{name}.weight{SCALE_SUFFIX}"))
        self.encoder = [linear(f"encoder.{i}") for i in range(len(c.encoder))]
        self.head = linear("head")
        self.decoder = [linear(f"decoder.{i}") for i in range(len(c.decoder))]
        self.out = linear("out")

    @property
    def nz(self) -> int:
        """The latent's size (what the DCGAN generators call nz)."""
        return self.config.latent

    # -- public ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, H, W) or (N, C*H*W) in [0, 1] -> (mu, logvar), float32 (N, L) each: q(z | x)."""
        head = self.backend.run_layers(self, self._encode, self._images(images))  # (N, 2L)
        return head[:, :self.nz], head[:, self.nz:]

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, L) -> float32 (N, C, H, W) in [0, 1]: the Bernoulli means sigmoid(l), what examples/vae's
        decode returns (reshaped to images)."""
        logits = self.backend.run_layers(self, self._decode, self._latent(z))  # (N, D)
        return torch.sigmoid(logits).reshape(-1, *self._image_shape)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, L) -> images float32 (N, C, H, W) in [-1, 1] (2 * decode(z) - 1): the range every image model of
        this runtime returns, which save_grid and `aigc-rt imagine` take."""
        return self.decode(z) * 2 - 1

    def generate(self, n: int = 16, seed: int | None = None) -> torch.Tensor:
        """n images in [-1, 1] from z ~ N(0, I), drawn on the CPU by torch.Generator().manual_seed(seed) as
        torch.randn(n, L) (seed None: a fresh random seed): a seed gives the same images on every device and
        backend."""
        check_count(n)
        return self(torch.randn(n, self.nz, generator=seeded_generator(seed)))

    @torch.inference_mode()
    def elbo(self, images: torch.Tensor, samples: int = 1, seed: int | None = None) -> torch.Tensor:
        """images (N, C, H, W) or (N, C*H*W) in [0, 1] -> float32 (N,): each image's evidence lower bound
        E_q[log p(x | z)] - KL(q(z | x) || N(0, I)) in nats, a lower bound of log p(x). The expectation is the mean
        over `samples` draws eps (samples, N, L) = torch.randn(samples, N, L) from
        torch.Generator().manual_seed(seed) on the CPU (seed None: a fresh random seed), z = mu + eps * std."""
        x, eps = self._images_and_eps(images, samples, seed)
        parts = self._over_samples(self._elbo, x, eps)
        if len(parts) == 1:
            return parts[0][0]
        # each chunk's ELBO is its samples' mean log-likelihood minus the same KL: their weighted mean is the ELBO
        return sum(elbo * (len(e) / samples) for elbo, e in parts)

    @torch.inference_mode()
    def log_likelihood(self, images: torch.Tensor, samples: int = 64, seed: int | None = None) -> torch.Tensor:
        """images (N, C, H, W) or (N, C*H*W) in [0, 1] -> float32 (N,): the importance-weighted estimate of log p(x)
        (Burda et al., IWAE), log 1/K sum_k p(x | z_k) p(z_k) / q(z_k | x) over K = `samples` draws z_k = mu + eps_k *
        std (eps drawn as elbo() draws them), in nats: a lower bound of log p(x) in expectation that tightens as K
        grows (papers report K = 5,000), and never below the ELBO estimated from the same draws."""
        x, eps = self._images_and_eps(images, samples, seed)
        log_w = torch.cat([w for w, _ in self._over_samples(self._log_weights, x, eps)])  # (K, N)
        return torch.logsumexp(log_w, dim=0) - math.log(samples)

    def _images_and_eps(self, images, samples, seed) -> tuple[torch.Tensor, torch.Tensor]:
        """-> images checked as (N, D), eps (samples, N, L) ~ N(0, I) from seed, both on the device."""
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
            raise ValueError(f"samples must be an integer in [1, {MAX_SAMPLES}], got {samples!r}")
        x = self._images(images)  # (N, D)
        return x, torch.randn(samples, x.shape[0], self.nz, generator=seeded_generator(seed)).to(self.device)

    def _over_samples(self, forward, x: torch.Tensor, eps: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(forward(x, e), e)] for eps in chunks of samples that decode at most CHUNK_LOGITS logits at once."""
        chunk = max(1, CHUNK_LOGITS // x.numel())
        return [(self.backend.run_layers(self, forward, x, e), e) for e in (eps.split(chunk) if len(eps) > chunk
                                                                             else [eps])]

    # -- the forwards (inputs checked, on the device) ---------------------------------------------------------
    def _encode(self, x: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N, 2L): mu, then logvar
        return self.backend.linear(self._hidden(x, self.encoder), self.head)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:  # (N, L) -> the logits l (N, D)
        return self.backend.linear(self._hidden(z, self.decoder), self.out)

    def _hidden(self, x: torch.Tensor, layers) -> torch.Tensor:
        for lin in layers:
            if self.config.act == "relu":
                x = self.backend.linear(x, lin, "relu")
            else:
                x = torch.tanh(self.backend.linear(x, lin))
        return x

    def _elbo(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:  # x (N, D), eps (S, N, L) -> (N,)
        head = self._encode(x)  # (N, 2L): mu, logvar
        z = self.backend.reparameterize(head, eps)  # (S, N, L)
        logits = self._decode(z.reshape(-1, self.nz)).reshape(*eps.shape[:2], -1)  # (S, N, D)
        return self.backend.bernoulli_elbo(logits, x, head)

    def _log_weights(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:  # x (N, D), eps (S, N, L) -> (S, N)
        """log p(x | z) + log p(z) - log q(z | x) per sample; with z = mu + eps * std the Gaussians' log-densities
        differ by 1/2 sum_j (eps_j^2 - z_j^2 + logvar_j) (their 2 pi terms cancel)."""
        head = self._encode(x)  # (N, 2L)
        z = self.backend.reparameterize(head, eps)  # (S, N, L)
        logits = self._decode(z.reshape(-1, self.nz)).reshape(*eps.shape[:2], -1)  # (S, N, D)
        log_prior_over_q = 0.5 * ((eps.square() - z.square()).sum(-1) + head[:, self.nz:].sum(-1))  # (S, N)
        return self.backend.bernoulli_log_likelihood(logits, x) + log_prior_over_q

    # -- input checks ----------------------------------------------------------------------------------------
    @property
    def _image_shape(self) -> tuple[int, int, int]:
        c = self.config
        return c.channels, c.height, c.width

    def _images(self, images) -> torch.Tensor:
        """images (N, C, H, W) or (N, D), checked, as float32 (N, D) on the device."""
        c = self.config
        hint = f"(n, {c.channels}, {c.height}, {c.width}) or (n, {c.pixels})"
        x = float_input(images, "images", hint, check_finite=False)
        if x.dim() not in (2, 4) or x.shape[1:] not in (torch.Size(self._image_shape), torch.Size([c.pixels])) \
                or x.shape[0] < 1:
            raise ValueError(f"images must have shape {hint} with n >= 1, got {tuple(x.shape)}")
        lo, hi = (v.item() for v in torch.aminmax(x))  # one pass (NaN propagates into both): the isfinite check too
        if math.isnan(lo) or math.isnan(hi):
            raise ValueError("images hold NaN values")
        if not (lo >= 0 and hi <= 1):
            raise ValueError(f"images must hold pixel values in [0, 1] (the VAE's Bernoulli likelihood), got values "
                             f"in [{lo:.3g}, {hi:.3g}]")
        return x.reshape(x.shape[0], c.pixels).to(self.device)

    def _latent(self, z) -> torch.Tensor:
        z = float_input(z, "latent z", f"(n, {self.nz})")
        if z.dim() != 2 or z.shape[1] != self.nz or z.shape[0] < 1:
            raise ValueError(f"latent z must have shape (n, {self.nz}) with n >= 1, got {tuple(z.shape)}")
        return z.to(self.device)

