"""Model configurations: named sizes, validated on construction (they come from files we do not trust)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from .errors import FormatError


def _check_fields(cls, values: dict) -> dict:
    """Keep the known fields of `cls`; raise FormatError for missing ones or ones of the wrong type."""
    if not isinstance(values, dict):
        raise FormatError(f"{cls.__name__}: config must be a JSON object, got {type(values).__name__}")
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            if f.default is dataclasses.MISSING:
                raise FormatError(f"{cls.__name__}: config lacks '{f.name}'")
            continue
        v = values[f.name]
        want = {"int": int, "float": (int, float), "int | None": (int, type(None)), "str": str, "bool": bool,
                "tuple[ConvLayer, ...]": list, "tuple[int, ...]": list}[f.type]
        if isinstance(v, bool) != (f.type == "bool") or not isinstance(v, want):
            raise FormatError(f"{cls.__name__}: config '{f.name}' must be {f.type}, got {v!r}")
        if f.type == "tuple[int, ...]":
            if not all(isinstance(e, int) and not isinstance(e, bool) for e in v):
                raise FormatError(f"{cls.__name__}: config '{f.name}' must be a list of integers, got {v!r}")
            v = tuple(v)
        out[f.name] = v
    return out


class TextConfig:
    """What the text models' configs share: from_dict / to_dict, and the checks of their sizes (LIMITS: each field
    in [1, max]) and eos token, with the arch's own checks (_check_more) between them."""
    LIMITS: ClassVar[tuple[tuple[str, int], ...]] = ()

    def __post_init__(self):
        name = type(self).__name__
        for field, hi in self.LIMITS:
            v = getattr(self, field)
            if not 1 <= v <= hi:
                raise FormatError(f"{name}: {field}={v} is out of range [1, {hi}]")
        self._check_more(name)
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            raise FormatError(f"{name}: eos_token_id={self.eos_token_id} is outside the vocabulary")

    def _check_more(self, name: str) -> None:
        pass

    def _check_heads_and_eps(self, name: str, width: str, eps: str) -> None:
        """The width divides into n_head heads; the LayerNorm epsilon is in (0, 1)."""
        if getattr(self, width) % self.n_head:
            raise FormatError(f"{name}: {width}={getattr(self, width)} is not divisible by n_head={self.n_head}")
        if not (math.isfinite(getattr(self, eps)) and 0 < getattr(self, eps) < 1):
            raise FormatError(f"{name}: {eps}={getattr(self, eps)} must be in (0, 1)")

    @classmethod
    def from_dict(cls, values: dict):
        return cls(**_check_fields(cls, values))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GPT2Config(TextConfig):
    vocab_size: int
    n_positions: int  # context length
    n_embd: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int | None = None
    LIMITS: ClassVar = (("vocab_size", 1 << 22), ("n_positions", 1 << 20), ("n_embd", 1 << 16), ("n_layer", 1024),
                        ("n_head", 1024))

    def _check_more(self, name: str) -> None:
        self._check_heads_and_eps(name, "n_embd", "layer_norm_epsilon")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# -- LSTM ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LSTMConfig(TextConfig):
    """The seed LSTM text generator: Embedding(vocab_size, n_embd) -> LSTM(n_embd, hidden_size, n_layer)
    -> Linear(hidden_size, vocab_size). Its state is fixed-size, so it has no context length."""
    vocab_size: int
    n_embd: int  # the embedding's width, the first LSTM layer's input
    hidden_size: int
    n_layer: int
    eos_token_id: int | None = None
    n_positions: ClassVar[int] = 1 << 40  # no context limit (generation checks prompts against it)
    LIMITS: ClassVar = (("vocab_size", 1 << 22), ("n_embd", 1 << 16), ("hidden_size", 1 << 16), ("n_layer", 1024))


# -- Transformer decoder ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransformerDecoderConfig(TextConfig):
    """The seed Transformer decoder text model: Embedding(vocab_size, d_model) -> nn.TransformerDecoder(
    nn.TransformerDecoderLayer(d_model, n_head, d_ff), n_layer) -> Linear(d_model, vocab_size), used as a decoder-only
    generator: the embedded tokens are both the target and the memory, under causal masks (see models/
    transformer_decoder.py). ReLU feed-forward; post-norm unless norm_first; final_norm: the TransformerDecoder's
    optional `norm`. No positional encoding, so no context length (the KV caches grow with the generation)."""
    vocab_size: int
    d_model: int
    n_head: int
    n_layer: int
    d_ff: int
    layer_norm_eps: float = 1e-5
    norm_first: bool = False
    final_norm: bool = False
    eos_token_id: int | None = None
    n_positions: ClassVar[int] = 1 << 40  # no context limit (generation checks prompts against it)
    LIMITS: ClassVar = (("vocab_size", 1 << 22), ("d_model", 1 << 16), ("n_head", 1024), ("n_layer", 1024),
                        ("d_ff", 1 << 18))

    def _check_more(self, name: str) -> None:
        self._check_heads_and_eps(name, "d_model", "layer_norm_eps")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# -- DCGAN ---------------------------------------------------------------------------------------------
GENERATOR_ACTS = ("relu", "tanh", "none")
DISCRIMINATOR_ACTS = ("leaky_relu", "sigmoid", "none")


@dataclass(frozen=True)
class ConvLayer:
    """One convolution (discriminator) or transposed convolution (generator) with its activation; BatchNorm
    is already folded into its weight and bias. Square kernels, equal strides/paddings in both dims."""
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    act: str
    output_padding: int = 0  # transposed convs only

    def __post_init__(self):
        for name, lo, hi in (("c_in", 1, 1 << 16), ("c_out", 1, 1 << 16), ("kernel", 1, 16), ("stride", 1, 16),
                             ("padding", 0, self.kernel - 1), ("output_padding", 0, self.stride - 1)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise FormatError(f"ConvLayer: {name}={v} is out of range [{lo}, {hi}]")

    def out_size(self, size: int, transposed: bool) -> int:
        """Spatial size after this layer (torch's formulas for ConvTranspose2d / Conv2d)."""
        if transposed:
            return (size - 1) * self.stride - 2 * self.padding + self.kernel + self.output_padding
        return (size + 2 * self.padding - self.kernel) // self.stride + 1

    @classmethod
    def from_dict(cls, values: dict) -> "ConvLayer":
        return cls(**_check_fields(cls, values))


@dataclass(frozen=True)
class DCGANConfig:
    """Generator (arch "dcgan"): z (N, nz, 1, 1) -> images (N, channels, image_size, image_size) in [-1, 1],
    through `layers` (transposed convs). layers[0].c_in is nz."""
    image_size: int
    layers: tuple[ConvLayer, ...]
    transposed: ClassVar[bool] = True
    acts: ClassVar[tuple[str, ...]] = GENERATOR_ACTS

    def __post_init__(self):
        name = type(self).__name__
        if not 1 <= self.image_size <= 4096:
            raise FormatError(f"{name}: image_size={self.image_size} is out of range [1, 4096]")
        if not 1 <= len(self.layers) <= 32:
            raise FormatError(f"{name}: needs 1 to 32 layers, got {len(self.layers)}")
        for i, layer in enumerate(self.layers):
            if layer.act not in self.acts:
                raise FormatError(f"{name}: layer {i} activation {layer.act!r} is not one of {self.acts}")
            if not self.transposed and layer.output_padding:
                raise FormatError(f"{name}: layer {i} is a convolution and cannot have output_padding")
            if i and layer.c_in != self.layers[i - 1].c_out:
                raise FormatError(f"{name}: layer {i} takes {layer.c_in} channels but layer {i - 1} gives "
                                  f"{self.layers[i - 1].c_out}")
        sizes = self.sizes()
        if min(sizes) < 1:
            raise FormatError(f"{name}: spatial sizes {sizes} shrink below 1 pixel")
        self._check_ends(name, sizes)

    def _check_ends(self, name: str, sizes: list[int]) -> None:
        if sizes[-1] != self.image_size:
            raise FormatError(f"{name}: the layers turn a 1x1 latent into {sizes[-1]}x{sizes[-1]} images, "
                              f"not image_size={self.image_size}")
        if self.channels not in (1, 3):
            raise FormatError(f"{name}: the last layer makes {self.channels} channels; images have 1 or 3")

    def sizes(self) -> list[int]:
        """Spatial size of the input of each layer, then of the output."""
        sizes = [1 if self.transposed else self.image_size]
        for layer in self.layers:
            sizes.append(layer.out_size(sizes[-1], self.transposed))
        return sizes

    @property
    def nz(self) -> int:
        return self.layers[0].c_in

    @property
    def channels(self) -> int:
        """Image channels: made by a generator, taken by a discriminator."""
        return self.layers[-1].c_out if self.transposed else self.layers[0].c_in

    @classmethod
    def from_dict(cls, values: dict) -> "DCGANConfig":
        v = _check_fields(cls, values)
        layers = []
        for i, layer in enumerate(v["layers"]):
            try:
                layers.append(ConvLayer.from_dict(layer))
            except FormatError as e:
                raise FormatError(f"{cls.__name__}: layer {i}: {e}") from None
        return cls(**{**v, "layers": tuple(layers)})

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "layers": [dataclasses.asdict(layer) for layer in self.layers]}


@dataclass(frozen=True)
class DCGANDiscriminatorConfig(DCGANConfig):
    """Discriminator (arch "dcgan_d"): images (N, channels, image_size, image_size) -> probabilities (N,)
    through `layers` (convs) down to one 1x1 output channel."""
    leaky_slope: float = 0.2
    transposed: ClassVar[bool] = False
    acts: ClassVar[tuple[str, ...]] = DISCRIMINATOR_ACTS

    def _check_ends(self, name: str, sizes: list[int]) -> None:
        if sizes[-1] != 1 or self.layers[-1].c_out != 1:
            raise FormatError(f"{name}: the layers turn {self.image_size}x{self.image_size} images into "
                              f"{self.layers[-1].c_out}x{sizes[-1]}x{sizes[-1]}, not one probability")
        if self.channels not in (1, 3):
            raise FormatError(f"{name}: the first layer takes {self.channels} channels; images have 1 or 3")
        if not (math.isfinite(self.leaky_slope) and 0 <= self.leaky_slope < 1):
            raise FormatError(f"{name}: leaky_slope={self.leaky_slope} must be in [0, 1)")


# -- VAE -----------------------------------------------------------------------------------------------
VAE_ACTS = ("relu", "tanh")  # PyTorch examples/vae; Kingma & Welling (2013)'s MLPs


@dataclass(frozen=True)
class VAEConfig:
    """A fully connected VAE over (channels, height, width) images with pixel values in [0, 1] (arch "vae"): the
    encoder's hidden layers `encoder` (widths) then one linear to (mu, logvar) of `latent` dims each; the decoder's
    hidden layers `decoder` then one linear to channels * height * width Bernoulli logits. Every hidden layer is
    followed by `act`. PyTorch's examples/vae: (1, 28, 28), encoder (400,), latent 20, decoder (400,), relu."""
    channels: int
    height: int
    width: int
    latent: int
    encoder: tuple[int, ...]
    decoder: tuple[int, ...]
    act: str = "relu"

    def __post_init__(self):
        name = type(self).__name__
        for field, hi in (("height", 4096), ("width", 4096), ("latent", 1 << 16)):
            if not 1 <= getattr(self, field) <= hi:
                raise FormatError(f"{name}: {field}={getattr(self, field)} is out of range [1, {hi}]")
        if self.channels not in (1, 3):
            raise FormatError(f"{name}: images have 1 or 3 channels, not {self.channels}")
        for field in ("encoder", "decoder"):
            widths = getattr(self, field)
            if len(widths) > 64 or not all(1 <= w <= 1 << 16 for w in widths):
                raise FormatError(f"{name}: {field} hidden widths {list(widths)} must be at most 64 widths in "
                                  f"[1, 65536]")
        if self.act not in VAE_ACTS:
            raise FormatError(f"{name}: act {self.act!r} is not one of {VAE_ACTS}")

    @property
    def pixels(self) -> int:
        """channels * height * width: the length of an image as the linears see it."""
        return self.channels * self.height * self.width

    @classmethod
    def from_dict(cls, values: dict) -> "VAEConfig":
        return cls(**_check_fields(cls, values))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "encoder": list(self.encoder), "decoder": list(self.decoder)}
