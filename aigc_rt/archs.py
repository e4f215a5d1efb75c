"""The architectures a runtime file can hold: how to check its tensors and build its model."""
from __future__ import annotations

from dataclasses import dataclass

from .config import DCGANConfig, DCGANDiscriminatorConfig, GPT2Config, LSTMConfig, TransformerDecoderConfig, VAEConfig
from .errors import FormatError
from .format import SCALE_SUFFIX, TensorSpec
from .models import dcgan, gpt2, lstm, transformer_decoder, vae


@dataclass(frozen=True)
class Arch:
    config: type  # has from_dict(dict) raising FormatError
    tensors: "callable"  # (config, dtype) -> TensorSpec
    model: type  # model(config, tensors, backend, tokenizer, dtype)
    text: bool  # needs a tokenizer
    indexed: tuple[str, ...] = ()  # tensors a decode step only indexes (rows by token or position), never streams


EMBEDDING = ("wte.weight", "wte.weight" + SCALE_SUFFIX)  # an embedding that is not also the lm_head (int8: + scales)
ARCHS = {
    "gpt2": Arch(GPT2Config, gpt2.expected_tensors, gpt2.GPT2, text=True, indexed=("wpe.weight",)),  # wte: lm_head
    "lstm": Arch(LSTMConfig, lstm.expected_tensors, lstm.LSTM, text=True, indexed=EMBEDDING),
    "transformer_decoder": Arch(TransformerDecoderConfig, transformer_decoder.expected_tensors,
                                transformer_decoder.TransformerDecoder, text=True,
                                indexed=EMBEDDING),
    "dcgan": Arch(DCGANConfig, dcgan.expected_tensors, dcgan.Generator, text=False),
    "dcgan_d": Arch(DCGANDiscriminatorConfig, dcgan.expected_tensors, dcgan.Discriminator, text=False),
    "vae": Arch(VAEConfig, vae.expected_tensors, vae.VAE, text=False),
}


def lookup(arch) -> Arch:
    if arch not in ARCHS:
        raise FormatError(f"unknown arch {arch!r} (this aigc_rt knows {sorted(ARCHS)})")
    return ARCHS[arch]


def expected(arch, dtype: str, config: dict) -> TensorSpec:
    a = lookup(arch)
    return a.tensors(a.config.from_dict(config), dtype)
