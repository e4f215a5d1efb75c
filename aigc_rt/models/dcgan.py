"""DCGAN generator and discriminator, written once against a backend's op set; read it top to bottom.

Generator (arch "dcgan"): z (N, nz) -> x = z as (N, nz, 1, 1); for each layer x = act(conv_transpose(x))
-> images (N, C, S, S) in [-1, 1] (tanh). Discriminator (arch "dcgan_d"): images -> for each layer
x = act(conv2d(x)) -> (N, 1, 1, 1) sigmoid probabilities (score), or the sigmoid's input (logits), from which
objective() takes the GAN min-max objective V(D, G). BatchNorm is folded into every layer's weight and
bias by the converter (convert/dcgan.py). Between layers a backend may keep activations in any memory format
(the cpu backend uses channels_last); the logical shapes are always (N, C, H, W).
A bf16 file holds bf16 weights: every layer then multiplies them with its input rounded to bf16, summing the
(exact) products in fp32 (backends: prepare_conv* see the weight's dtype); the layers before the last may hand on
their outputs rounded to bf16 already (out_bf16, the same numbers), the last one's is fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import DCGANConfig, DCGANDiscriminatorConfig
from ..errors import FormatError
from .inputs import check_count, float_input, seeded_generator

WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def expected_tensors(c: DCGANConfig, dtype: str):
    """Weights in torch's layouts (ConvTranspose2d [in, out, k, k]; Conv2d [out, in, k, k]), fp32 or bf16;
    fp32 biases."""
    if dtype not in WEIGHT_DTYPES:
        raise FormatError(f"DCGAN files hold fp32 or bf16 weights, not {dtype}")
    spec = {}
    for i, layer in enumerate(c.layers):
        io = (layer.c_in, layer.c_out) if c.transposed else (layer.c_out, layer.c_in)
        spec[f"layers.{i}.weight"] = ((*io, layer.kernel, layer.kernel), WEIGHT_DTYPES[dtype])
        spec[f"layers.{i}.bias"] = ((layer.c_out,), torch.float32)
    return spec


def hands_on_bf16(n_layers: int, dtype: str) -> list[bool]:
    """Per layer, whether its output only feeds a layer that rounds it to bf16 (every layer but the last of a
    bf16 file): the backend may then hand it on rounded already (out_bf16)."""
    return [dtype == "bf16" and i + 1 < n_layers for i in range(n_layers)]


class Generator:
    arch = "dcgan"

    def __init__(self, config: DCGANConfig, tensors: dict[str, torch.Tensor], backend, tokenizer=None,
                 dtype: str = "fp32"):
        self.config, self.backend, self.tokenizer, self.dtype = config, backend, tokenizer, dtype
        self.device = backend.device
        self.layers = [(backend.prepare_conv_transpose(tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"],
                                                       layer.stride, layer.padding, layer.output_padding),
                        layer.act) for i, layer in enumerate(config.layers)]
        self.out_bf16 = hands_on_bf16(len(self.layers), dtype)

    @property
    def nz(self) -> int:
        return self.config.nz

    @torch.inference_mode()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """z (N, nz) or (N, nz, 1, 1) -> images float32 (N, C, S, S) in [-1, 1] (contiguous NCHW)."""
        hint = f"(n, {self.nz}) or (n, {self.nz}, 1, 1)"
        z = float_input(z, "latent z", hint)
        if z.dim() not in (2, 4) or z.shape[1:] not in (torch.Size([self.nz]), torch.Size([self.nz, 1, 1])):
            raise ValueError(f"latent z must have shape {hint}, got {tuple(z.shape)}")
        if z.shape[0] < 1:
            raise ValueError("latent z holds no samples (n = 0)")
        x = z.reshape(-1, self.nz, 1, 1).to(self.device)  # (N, nz, 1, 1)
        return self.backend.run_layers(self, self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, nz, 1, 1) on the device -> images (N, C, S, S)
        for (layer, act), out_bf16 in zip(self.layers, self.out_bf16):
            x = self.backend.conv_transpose(x, layer, act, out_bf16)  # (N, C_out, H_out, W_out)
        return x.contiguous()

    def generate(self, n: int = 16, seed: int | None = None) -> torch.Tensor:
        """n images from z ~ N(0, 1) drawn on the CPU by torch.Generator().manual_seed(seed), so a seed gives
        the same images on every device and backend (seed None: a fresh random seed)."""
        check_count(n)
        return self(torch.randn(n, self.nz, generator=seeded_generator(seed)))  # (n, nz)


class Discriminator:
    arch = "dcgan_d"

    def __init__(self, config: DCGANDiscriminatorConfig, tensors: dict[str, torch.Tensor], backend,
                 tokenizer=None, dtype: str = "fp32"):
        self.config, self.backend, self.tokenizer, self.dtype = config, backend, tokenizer, dtype
        self.device = backend.device
        self.layers = [(backend.prepare_conv2d(tensors[f"layers.{i}.weight"], tensors[f"layers.{i}.bias"],
                                               layer.stride, layer.padding), layer.act)
                       for i, layer in enumerate(config.layers)]
        self.out_bf16 = hands_on_bf16(len(self.layers), dtype)

    @torch.inference_mode()
    def score(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, S, S) in [-1, 1] -> float32 (N,): D(x), the probability that each image is real."""
        return self.backend.run_layers(self, self._forward, self._images(images))

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, S, S) in [-1, 1] -> float32 (N,): l, the input of the last layer's sigmoid, D(x) =
        sigmoid(l). log D(x) = logsigmoid(l) and log(1 - D(x)) = logsigmoid(-l) stay exact where D(x) itself
        rounds to 0 or 1."""
        if self.layers[-1][1] != "sigmoid":
            raise ValueError(f"this discriminator's last layer ends in {self.layers[-1][1]!r}, not a sigmoid: it "
                             "has no logits")
        return self.backend.run_layers(self, self._forward_logits, self._images(images))

    def objective(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        """The GAN min-max objective V(D, G) = E[log D(x)] + E[log(1 - D(G(z)))], the means over real images x and
        over generated ones G(z) (each (N, C, S, S) in [-1, 1]): D maximises it, G minimises it. -V is the
        discriminator's BCE loss as the seed system trains it (nn.BCELoss, real label 1, fake label 0, each batch
        averaged, summed), here from logits (logits()), so exact where nn.BCELoss clamps a log at -100."""
        return (F.logsigmoid(self.logits(real)).mean() + F.logsigmoid(-self.logits(fake)).mean()).item()

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        """images, checked, as float32 on the device."""
        c = self.config
        hint = f"(n, {c.channels}, {c.image_size}, {c.image_size})"
        x = float_input(images, "images", hint)
        if x.dim() != 4 or x.shape[1:] != (c.channels, c.image_size, c.image_size) or x.shape[0] < 1:
            raise ValueError(f"images must have shape {hint} with n >= 1, got {tuple(x.shape)}")
        return x.to(self.device)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # images (N, C, S, S) on the device -> (N,)
        return self._layers(x, self.layers[-1][1])

    def _forward_logits(self, x: torch.Tensor) -> torch.Tensor:  # the same, without the last sigmoid
        return self._layers(x, "none")

    def _layers(self, x: torch.Tensor, last_act: str) -> torch.Tensor:
        acts = [act for _, act in self.layers[:-1]] + [last_act]
        for (layer, _), act, out_bf16 in zip(self.layers, acts, self.out_bf16):
            x = self.backend.conv2d(x, layer, act, self.config.leaky_slope, out_bf16)  # (N, C_out, H_out, W_out)
        return x.reshape(-1)

    __call__ = score
