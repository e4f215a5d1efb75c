"""PyTorch DCGAN state_dict (generator or discriminator) -> runtime tensors and config.

Owns every checkpoint quirk:
- the `main.N` indices of an nn.Sequential (activations hold no parameters, so indices skip), under any
  common prefix, and the `module.` prefix that DataParallel adds;
- .pt / .pth files (torch.load(weights_only=True): a state_dict, or a dict holding one under "state_dict")
  and .safetensors files;
- eval-mode BatchNorm folded into the preceding (transposed) conv, per output channel c (in float64):
      scale[c] = gamma[c] / sqrt(running_var[c] + eps)          eps = 1e-5, BatchNorm2d's default
      W'[.., c, ..] = W[.., c, ..] * scale[c]                   b'[c] = (b[c] - running_mean[c]) * scale[c] + beta[c]
- what a state_dict does not hold: strides, paddings and activations. They follow the DCGAN pattern
  (4x4 kernels everywhere). Generator: the first transposed conv stride 1 padding 0 (1x1 -> 4x4), the
  others stride 2 padding 1 (x2 each); ReLU between layers, Tanh at the end. Discriminator: stride 2
  padding 1 (/2 each), the last conv stride 1 padding 0 (4x4 -> 1x1); LeakyReLU(0.2) between layers,
  Sigmoid at the end. So a generator or discriminator of L layers works on 4 * 2**(L-1) pixel images:
  the 32x32 seed system (L=4) and the 64x64 PyTorch tutorial (L=5).

Generator vs discriminator (and so the variant) is read from the shapes: ConvTranspose2d weights are
[in, out, k, k] and chain as W[i+1].shape[0] == W[i].shape[1]; Conv2d weights are [out, in, k, k] and chain
as W[i+1].shape[1] == W[i].shape[0]. The file keeps the weights in torch's layouts (ConvTranspose2d
[in, out, k, k], Conv2d [out, in, k, k]; the reference backend uses them as they are, the cpu backend
repacks them once at load) plus one fp32 bias per layer.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from ..config import ConvLayer, DCGANConfig, DCGANDiscriminatorConfig
from ..errors import FormatError, is_foreign_error

BN_EPS = 1e-5
KERNEL = 4
LEAKY_SLOPE = 0.2
SUFFIXES = (".pt", ".pth", ".safetensors")
# converter name -> (runtime arch, image size it must have or None for any)
VARIANTS = {"dcgan": ("dcgan", None), "dcgan32": ("dcgan", 32), "dcgan64": ("dcgan", 64),
            "dcgan_d": ("dcgan_d", None), "dcgan32_d": ("dcgan_d", 32), "dcgan64_d": ("dcgan_d", 64)}
ROLE_NAMES = {"dcgan": "generator", "dcgan_d": "discriminator"}
_KEY = re.compile(r"^(.*?)(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


@dataclass
class _Conv:
    name: str  # e.g. "main.3", for messages
    weight: torch.Tensor  # (in, out, k, k) transposed / (out, in, k, k) conv
    bias: torch.Tensor | None
    bn: dict[str, torch.Tensor] | None = None  # weight, bias, running_mean, running_var


def is_torch_checkpoint(src: str) -> bool:
    return os.path.isfile(src) and src.lower().endswith(SUFFIXES)


def read_state_dict(src: str) -> dict[str, torch.Tensor]:
    """The tensors of a .pt/.pth/.safetensors checkpoint, with DataParallel's `module.` prefix removed."""
    try:
        if src.lower().endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(src, framework="pt") as f:
                if (f.metadata() or {}).get("format") == "aigc-rt":
                    raise FormatError(f"{src}: already an aigc-rt runtime file; load it with aigc_rt.load")
                sd = {k: f.get_tensor(k) for k in f.keys()}
        else:
            sd = torch.load(src, map_location="cpu", weights_only=True)
    except FormatError:
        raise
    except BaseException as e:
        if not is_foreign_error(e):
            raise
        raise FormatError(f"{src}: cannot read the checkpoint ({type(e).__name__}: {e}); save the model's "
                          f"state_dict() (a pickled module cannot be loaded with weights_only=True)") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FormatError(f"{src}: expected a state_dict (a non-empty dict of tensors), got {type(sd).__name__}")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _parse_layers(sd: dict[str, torch.Tensor], src: str) -> list[_Conv]:
    """Group `<prefix><index>.<leaf>` tensors by Sequential index: convs (4-D weight, optional bias), each
    optionally followed by a BatchNorm (1-D weight, bias, running_mean, running_var)."""
    groups: dict[int, dict[str, torch.Tensor]] = {}
    prefixes = set()
    for key, t in sd.items():
        m = _KEY.match(key)
        if not m:
            raise FormatError(f"{src}: unexpected tensor {key!r} in a DCGAN state_dict (expected "
                              f"'<prefix><index>.weight' and the like, as nn.Sequential names them)")
        prefixes.add(m.group(1))
        groups.setdefault(int(m.group(2)), {})[m.group(3)] = t
    if len(prefixes) != 1:
        raise FormatError(f"{src}: tensors under several prefixes {sorted(prefixes)}; expected one Sequential")
    prefix = prefixes.pop()
    convs: list[_Conv] = []
    for idx in sorted(groups):
        g, name = groups[idx], f"{prefix}{idx}"
        w = g.get("weight")
        if w is None:
            raise FormatError(f"{src}: {name} has no weight")
        if w.dim() == 4:
            if set(g) - {"weight", "bias"}:
                raise FormatError(f"{src}: {name} has a 4-D weight (a conv) but also {sorted(set(g) - {'weight', 'bias'})}")
            if w.shape[2] != w.shape[3]:
                raise FormatError(f"{src}: {name}.weight has a non-square kernel {list(w.shape[2:])}")
            convs.append(_Conv(name, w.double(), None if g.get("bias") is None else g["bias"].double()))
        elif w.dim() == 1:
            need = {"weight", "bias", "running_mean", "running_var"}
            if not need <= set(g):
                raise FormatError(f"{src}: BatchNorm {name} lacks {sorted(need - set(g))} (running statistics are "
                                  f"needed to fold it: track_running_stats=True)")
            if not convs or convs[-1].bn is not None:
                raise FormatError(f"{src}: BatchNorm {name} does not follow a convolution")
            if any(g[k].shape != w.shape for k in need):
                raise FormatError(f"{src}: BatchNorm {name} tensors have different shapes")
            convs[-1].bn = {k: g[k].double() for k in need}
        else:
            raise FormatError(f"{src}: {name}.weight has {w.dim()} dimensions (expected 4 for a conv, 1 for a "
                              f"BatchNorm)")
    if not convs:
        raise FormatError(f"{src}: no convolution weights found")
    return convs


def _chains(convs: list[_Conv], transposed: bool) -> bool:
    """Do the weights chain as ConvTranspose2d ([in, out, k, k]) or Conv2d ([out, in, k, k]) layers, with
    each BatchNorm sized by its conv's outputs?"""
    o, i = (1, 0) if transposed else (0, 1)
    for a, b in zip(convs, convs[1:]):
        if b.weight.shape[i] != a.weight.shape[o]:
            return False
    return all(c.bn is None or c.bn["weight"].numel() == c.weight.shape[o] for c in convs) and \
        all(c.bias is None or c.bias.numel() == c.weight.shape[o] for c in convs)


def detect_role(convs: list[_Conv], src: str) -> str:
    gen, disc = _chains(convs, True), _chains(convs, False)
    if gen and disc:  # only square channel counts chain both ways: the ends decide
        gen, disc = convs[-1].weight.shape[1] in (1, 3), convs[-1].weight.shape[0] == 1
    if gen == disc:
        shapes = ", ".join(f"{c.name}.weight {list(c.weight.shape)}" for c in convs)
        raise FormatError(f"{src}: cannot tell a DCGAN generator from a discriminator ({shapes}); "
                          f"pass arch='dcgan' or 'dcgan_d'" if gen else
                          f"{src}: the conv weights do not chain as a DCGAN generator or discriminator ({shapes})")
    return "dcgan" if gen else "dcgan_d"


def detect_arch(src: str) -> str:
    return detect_role(_parse_layers(read_state_dict(src), src), src)


def _fold(c: _Conv, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (weight, bias) fp32 with the BatchNorm folded in (see the module docstring)."""
    out_dim = 1 if transposed else 0
    n_out = c.weight.shape[out_dim]
    bias = c.bias if c.bias is not None else torch.zeros(n_out, dtype=torch.float64)
    weight = c.weight
    if c.bn is not None:
        scale = c.bn["weight"] / torch.sqrt(c.bn["running_var"] + BN_EPS)
        shape = [1, 1, 1, 1]
        shape[out_dim] = n_out
        weight = weight * scale.view(shape)
        bias = (bias - c.bn["running_mean"]) * scale + c.bn["bias"]
    return weight.float().contiguous(), bias.float().contiguous()


def _describe(src: str, variant: str | None) -> tuple[str, DCGANConfig, list[_Conv]]:
    """-> (runtime arch, config, parsed layers) of a checkpoint. variant: a VARIANTS key, None to read it."""
    convs = _parse_layers(read_state_dict(src), src)
    role, size = VARIANTS[variant] if variant else (detect_role(convs, src), None)
    transposed = role == "dcgan"
    if not _chains(convs, transposed):
        raise FormatError(f"{src}: the weights do not chain as a DCGAN {ROLE_NAMES[role]} "
                          f"({', '.join(str(list(c.weight.shape)) for c in convs)})")
    for c in convs:
        if c.weight.shape[2] != KERNEL:
            raise FormatError(f"{src}: {c.name} has a {c.weight.shape[2]}x{c.weight.shape[2]} kernel; the strides "
                              f"and paddings a state_dict lacks are known for the DCGAN pattern (4x4 kernels) only")
    image_size = 4 * 2 ** (len(convs) - 1)
    if size is not None and size != image_size:
        raise FormatError(f"{src}: arch {variant!r} expects a {size}x{size} {ROLE_NAMES[role]}, but its "
                          f"{len(convs)} layers make a {image_size}x{image_size} one")
    layers = []
    for i, c in enumerate(convs):
        last = i == len(convs) - 1
        c_in, c_out = (c.weight.shape[0], c.weight.shape[1]) if transposed else (c.weight.shape[1], c.weight.shape[0])
        edge = i == 0 if transposed else last  # the 1x1 <-> 4x4 layer
        if transposed:
            act = "tanh" if last else "relu"
        else:
            act = "sigmoid" if last else "leaky_relu"
        layers.append(ConvLayer(c_in=int(c_in), c_out=int(c_out), kernel=KERNEL, stride=1 if edge else 2,
                                padding=0 if edge else 1, act=act))
    try:
        config = DCGANConfig(image_size, tuple(layers)) if transposed else \
            DCGANDiscriminatorConfig(image_size, tuple(layers), leaky_slope=LEAKY_SLOPE)
    except FormatError as e:
        raise FormatError(f"{src}: {e}") from None
    return role, config, convs


DTYPES = ("fp32", "bf16")  # bf16: the (BatchNorm-folded) weights rounded to bf16, biases fp32


def convert_dcgan(src: str, dtype: str, variant: str | None = None):
    """-> (runtime arch, config dict, tensors). variant: a VARIANTS key, None to read it from the shapes.
    dtype "bf16": weights in bf16 (folded in fp32 first, then rounded), which the runtime multiplies with each
    layer's input rounded to bf16, summing in fp32 (models/dcgan.py)."""
    if dtype not in DTYPES:
        raise ValueError(f"DCGAN runtime files hold fp32 or bf16 weights; dtype={dtype!r} is not supported")
    role, config, convs = _describe(src, variant)
    tensors = {}
    for i, c in enumerate(convs):
        weight, bias = _fold(c, config.transposed)
        tensors[f"layers.{i}.weight"] = weight.bfloat16() if dtype == "bf16" else weight
        tensors[f"layers.{i}.bias"] = bias
    return role, config.to_dict(), tensors


def reference_module(src: str) -> torch.nn.Module:
    """The checkpoint as the eval-mode torch module it came from (BatchNorm unfolded), following the same
    DCGAN pattern: what `aigc-rt validate` compares a converted file with. Generators take (N, nz, 1, 1);
    discriminators return (N, 1, 1, 1) probabilities."""
    from torch import nn
    role, config, convs = _describe(src, None)
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE), "sigmoid": nn.Sigmoid}
    modules = []
    for layer, c in zip(config.layers, convs):
        cls = nn.ConvTranspose2d if config.transposed else nn.Conv2d
        conv = cls(layer.c_in, layer.c_out, layer.kernel, layer.stride, layer.padding, bias=c.bias is not None)
        conv.load_state_dict({"weight": c.weight.float(), **({"bias": c.bias.float()} if c.bias is not None else {})})
        modules.append(conv)
        if c.bn is not None:
            bn = nn.BatchNorm2d(layer.c_out, eps=BN_EPS)
            bn.load_state_dict({k: v.float() for k, v in c.bn.items()}, strict=False)
            modules.append(bn)
        modules.append(acts[layer.act]())
    return nn.Sequential(*modules).eval()
