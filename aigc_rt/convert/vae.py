"""PyTorch state_dict of a fully connected VAE -> runtime tensors and config (models/vae.py).

The seed is PyTorch's examples/vae (Kingma & Welling's MLP VAE on MNIST):

    fc1 = Linear(784, 400); fc21 = Linear(400, 20); fc22 = Linear(400, 20)     encoder, then mu and logvar heads
    fc3 = Linear(20, 400);  fc4 = Linear(400, 784)                              decoder, sigmoid at the end

Owns every checkpoint quirk:
- the module names are the user's: the Linear layers are taken in the order the state_dict holds them (modules
  register, and so save, in the order __init__ creates them: encoder, heads, decoder). The mu / logvar heads are
  the pair of same-shaped linears (L, h) that the encoder chains into and whose output width L the decoder
  takes; where several pairs fit, the one whose names say mu and (log)var (or examples/vae's fc21 / fc22) wins;
- a Linear without bias gets a zero bias; the heads are stacked into one (2L, h) linear, mu's rows first;
- what a state_dict does not hold comes from `config`: the image shape (channels, height, width), read from the
  input width when it is 784 (1, 28, 28: MNIST), 3072 (3, 32, 32) or 12288 (3, 64, 64), or a square s * s (1, s, s);
  and the hidden activation `act` (relu: examples/vae; tanh: Kingma & Welling's MLPs);
- .pt / .pth / .safetensors files, DataParallel's `module.` prefix (read_state_dict, shared with the DCGAN
  converter).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..config import VAEConfig
from ..errors import FormatError
from ..format import to_file_layout
from ..models.vae import expected_tensors, layer_names
from .dcgan import read_state_dict

SHAPES = {784: (1, 28, 28), 3072: (3, 32, 32), 12288: (3, 64, 64)}  # input width -> (channels, height, width)
CONFIG_KEYS = ("channels", "height", "width", "act")  # what convert(..., config=) may set
_MU = re.compile(r"(^|[._])(fc21|mu|mean)([._]|$)", re.IGNORECASE)
_LOGVAR = re.compile(r"(^|[._])(fc22|logvar|log_var|var|logsigma|log_sigma|sigma|std)([._]|$)", re.IGNORECASE)


@dataclass
class _Linear:
    name: str  # the module's name, e.g. "fc21"
    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor | None  # (out,)


def _linears(sd: dict[str, torch.Tensor]) -> list[_Linear] | None:
    """The state_dict as Linear modules in saved order, or None if it holds anything else."""
    weights = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    if not weights or any(sd[name + ".weight"].dim() != 2 for name in weights):
        return None
    known = {name + suffix for name in weights for suffix in (".weight", ".bias")}
    if set(sd) - known or not all(sd[k].dim() == 1 for k in sd if k.endswith(".bias")):
        return None
    return [_Linear(name, sd[name + ".weight"], sd.get(name + ".bias")) for name in weights]


def _head_candidates(layers: list[_Linear]) -> list[int]:
    """Indices i where layers i and i + 1 can be the mu and logvar heads: same shape (L, h), the encoder before them
    chains into them (or there is none), and the decoder after them (at least its output layer) takes L."""
    out = []
    for i in range(len(layers) - 2):
        a, b = layers[i].weight, layers[i + 1].weight
        if a.shape != b.shape:
            continue
        chains_in = i == 0 or layers[i - 1].weight.shape[0] == a.shape[1]
        if chains_in and layers[i + 2].weight.shape[1] == a.shape[0]:
            out.append(i)
    return out


def _chain(layers: list[_Linear]) -> bool:
    return all(nxt.weight.shape[1] == prev.weight.shape[0] for prev, nxt in zip(layers, layers[1:]))


def _split(layers: list[_Linear], src: str) -> tuple[list[_Linear], _Linear, _Linear, list[_Linear]]:
    """-> (encoder hidden layers, mu head, logvar head, decoder layers incl. the output layer)."""
    found = [i for i in _head_candidates(layers)
             if _chain(layers[:i + 1]) and _chain(layers[i + 2:]) and layers[-1].weight.shape[0] ==
             layers[0].weight.shape[1]]
    named = [i for i in found if _MU.search(layers[i].name) and _LOGVAR.search(layers[i + 1].name)]
    if len(found) > 1 and len(named) == 1:
        found = named
    if len(found) != 1:
        shapes = ", ".join(f"{x.name} {list(x.weight.shape)}" for x in layers)
        why = "no" if not found else "more than one"
        raise FormatError(f"{src}: {why} way to read these linears as a VAE (encoder, two same-shaped mu / logvar "
                          f"heads, decoder back to the input width): {shapes}")
    i = found[0]
    return layers[:i], layers[i], layers[i + 1], layers[i + 2:]


def is_vae_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """Linear layers only: of the archs converted here, only a VAE is made of them (convert_vae then says what
    does not fit)."""
    return _linears(sd) is not None


def image_shape(pixels: int, config: dict, src: str) -> tuple[int, int, int]:
    """(channels, height, width) of the images: from config, else from the input width (SHAPES, a square)."""
    if any(k in config for k in ("channels", "height", "width")):
        try:
            shape = tuple(int(config[k]) for k in ("channels", "height", "width"))
        except KeyError as e:
            raise ValueError(f"config= gives part of the image shape; give channels, height and width (lacks {e})") \
                from None
        if math.prod(shape) != pixels:
            raise ValueError(f"config= says images of {shape} = {math.prod(shape)} values; {src} takes {pixels}")
        return shape
    if pixels in SHAPES:
        return SHAPES[pixels]
    side = math.isqrt(pixels)
    if side * side == pixels:
        return 1, side, side
    raise FormatError(f"{src}: the VAE takes {pixels} values per image, which is no square image; pass "
                      f"config={{'channels': C, 'height': H, 'width': W}}")


def _parse(sd: dict[str, torch.Tensor], src: str, config: dict | None):
    """-> (VAEConfig, {runtime name: fp32 tensor})."""
    config = dict(config or {})
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"config= for a VAE may set {list(CONFIG_KEYS)}, not {sorted(unknown)}")
    layers = _linears(sd)
    if layers is None:
        raise FormatError(f"{src}: a VAE state_dict holds only Linear layers (NAME.weight 2-D, NAME.bias 1-D); "
                          f"this one holds {sorted(sd)[:6]}")
    encoder, mu, logvar, decoder = _split(layers, src)
    channels, height, width = image_shape(layers[0].weight.shape[1], config, src)
    try:
        c = VAEConfig(channels=channels, height=height, width=width, latent=mu.weight.shape[0],
                      encoder=tuple(x.weight.shape[0] for x in encoder),
                      decoder=tuple(x.weight.shape[0] for x in decoder[:-1]), act=config.get("act", "relu"))
    except FormatError as e:
        raise FormatError(f"{src}: {e}") from None

    def bias(x: _Linear) -> torch.Tensor:
        return torch.zeros(x.weight.shape[0]) if x.bias is None else x.bias.float()

    head = _Linear("head", torch.cat([mu.weight, logvar.weight]), torch.cat([bias(mu), bias(logvar)]))
    runtime = [*encoder, head, *decoder]
    tensors = {}
    for (name, _, _), x in zip(layer_names(c), runtime):
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = x.weight.float(), bias(x)
    return c, tensors


def convert_vae(src: str, dtype: str, config: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (config dict, tensors in the file layout: matrices in `dtype`, biases fp32)."""
    c, tensors = _parse(read_state_dict(src), src, config)
    return c.to_dict(), to_file_layout(tensors, expected_tensors(c, dtype), src)


class ReferenceVAE(torch.nn.Module):
    """examples/vae's module, generalised to any widths: encode(x) -> (mu, logvar), decode(z) -> sigmoid means."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        self.act = torch.relu if c.act == "relu" else torch.tanh
        self.layers = torch.nn.ModuleDict({name.replace(".", "_"): torch.nn.Linear(n_in, n_out)
                                           for name, n_in, n_out in layer_names(c)})
        self.c = c

    def _mlp(self, x: torch.Tensor, prefix: str, n: int, last: str) -> torch.Tensor:
        for i in range(n):
            x = self.act(self.layers[f"{prefix}_{i}"](x))
        return self.layers[last](x)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self._mlp(x.reshape(x.shape[0], -1), "encoder", len(self.c.encoder), "head")
        return head.chunk(2, dim=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._mlp(z, "decoder", len(self.c.decoder), "out"))


def reference_module(src: str, config: dict | None = None) -> ReferenceVAE:
    """The checkpoint as an eval-mode torch module with examples/vae's encode / decode (heads stacked, biases
    as saved or zero): what `aigc-rt validate` compares a converted file with."""
    c, tensors = _parse(read_state_dict(src), src, config)
    ref = ReferenceVAE(c)
    ref.layers.load_state_dict({k.replace(".", "_", k.count(".") - 1): v for k, v in tensors.items()})
    return ref.eval()
