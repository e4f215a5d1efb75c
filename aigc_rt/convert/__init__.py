"""Checkpoint converters: a source checkpoint -> one runtime .safetensors file (see format.py)."""
from __future__ import annotations

import functools
import os

from .. import format as fmt
from ..errors import FormatError
from .dcgan import VARIANTS as DCGAN_VARIANTS
from .dcgan import convert_dcgan, is_torch_checkpoint, read_state_dict
from .dcgan import detect_arch as detect_dcgan_arch
from .gpt2 import convert_gpt2, is_hf_gpt2_dir
from .lstm import convert_lstm, is_lstm_state_dict
from .transformer_decoder import convert_transformer_decoder, is_transformer_decoder_state_dict
from .vae import convert_vae, is_vae_state_dict


def _gpt2(src: str, dtype: str):
    return ("gpt2", *convert_gpt2(src, dtype))


def _lstm(src: str, dtype: str, tokenizer=None):
    return ("lstm", *convert_lstm(src, dtype, tokenizer))


def _transformer_decoder(src: str, dtype: str, tokenizer=None, config: dict | None = None):
    return ("transformer_decoder", *convert_transformer_decoder(src, dtype, tokenizer, config))


def _vae(src: str, dtype: str, config: dict | None = None):
    return ("vae", *convert_vae(src, dtype, config), None)


def _dcgan(src: str, dtype: str, variant: str):
    return (*convert_dcgan(src, dtype, variant), None)


# arch -> converter(src, dtype) -> (runtime arch, config dict, tensors, tokenizer JSON or None)
CONVERTERS = {"gpt2": _gpt2, "lstm": _lstm, "transformer_decoder": _transformer_decoder, "vae": _vae,
              **{v: functools.partial(_dcgan, variant=v) for v in DCGAN_VARIANTS}}
TAKES_TOKENIZER = ("lstm", "transformer_decoder")  # checkpoints without a vocabulary: convert(..., tokenizer=PATH)
TAKES_CONFIG = ("transformer_decoder", "vae")  # checkpoints lacking what their shapes don't show: convert(config=)


def detect_arch(src: str) -> str:
    if is_hf_gpt2_dir(src):
        return "gpt2"
    if is_torch_checkpoint(src):
        sd = read_state_dict(src)
        if is_lstm_state_dict(sd):
            return "lstm"
        if is_vae_state_dict(sd):
            return "vae"
        return "transformer_decoder" if is_transformer_decoder_state_dict(sd) else detect_dcgan_arch(src)
    if not os.path.exists(src):
        raise FormatError(f"{src}: no such file or directory")
    raise FormatError(f"{src}: cannot tell what this checkpoint is (expected a Hugging Face GPT-2 folder with "
                      f"config.json, or an LSTM, Transformer decoder, VAE or DCGAN state_dict .pt/.pth/.safetensors); "
                      f"pass arch= to say")


def reencode(src: str, dtype: str, arch: str | None = None):
    """A runtime file (fp32, bf16 or fp16; of `arch` if given) in another dtype: (arch, config, tensors, tokenizer
    JSON). Quantised files are refused: rounding their rounded weights again would compound the error."""
    from .. import archs
    rf = fmt.read(src, archs.expected)
    if arch is not None and arch != rf.arch:
        raise ValueError(f"{src} is a {rf.arch} runtime file, not {arch}")
    if rf.dtype in ("int8", "int4"):
        raise FormatError(f"{src}: already quantised ({rf.dtype}); convert the original checkpoint, or an fp32, bf16 "
                          f"or fp16 runtime file, to {dtype}")
    arch = archs.lookup(rf.arch)
    try:
        spec = arch.tensors(arch.config.from_dict(rf.config), dtype)
    except FormatError as e:
        raise FormatError(f"{src}: {e}") from None
    tensors = fmt.to_file_layout({k: v.float() for k, v in rf.tensors.items()}, spec, src)
    return rf.arch, rf.config, tensors, rf.tokenizer


def convert(src, dst, arch: str | None = None, dtype: str = "fp32", tokenizer=None, config: dict | None = None) -> str:
    """Convert checkpoint `src` to the runtime file `dst`; returns dst. tokenizer: for checkpoints without a
    vocabulary of their own (lstm, transformer_decoder), a tokenizer.json or a character vocabulary (see
    convert/lstm.py). config: what a state_dict does not hold (transformer_decoder: n_head, norm_first, ...).
    src may also be a runtime file (or an embedded model's short name, e.g. "gpt2-tiny"): it is written again in
    `dtype` (reencode; e.g. an fp32 file quantised to int8 or int4)."""
    from ..api import resolve_path
    src, dst = resolve_path(src), os.fspath(dst)
    if dtype not in fmt.DTYPES:
        raise ValueError(f"dtype must be one of {sorted(fmt.DTYPES)}, got {dtype!r}")
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise ValueError(f"{dst} is the source itself: write the converted file elsewhere")
    if fmt.is_runtime_file(src):
        if tokenizer is not None or config is not None:
            raise ValueError(f"{src} is an aigc-rt runtime file: it has its tokenizer and config (tokenizer= and "
                             f"config= are for checkpoints)")
        runtime_arch, file_config, tensors, tokenizer_json = reencode(src, dtype, arch)
    else:
        runtime_arch, file_config, tensors, tokenizer_json = _convert_checkpoint(src, arch, dtype, tokenizer, config)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    fmt.save(dst, runtime_arch, dtype, file_config, tensors, tokenizer_json)
    return dst


def _convert_checkpoint(src: str, arch: str | None, dtype: str, tokenizer, config: dict | None):
    """convert()'s work for a checkpoint: (runtime arch, config dict, tensors, tokenizer JSON or None)."""
    if arch is not None and arch not in CONVERTERS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(CONVERTERS)}")
    arch = arch or detect_arch(src)
    if not os.path.exists(src):
        raise FormatError(f"{src}: no such file or directory")
    if tokenizer is not None and arch not in TAKES_TOKENIZER:
        raise ValueError(f"tokenizer= is for checkpoints without a vocabulary ({', '.join(TAKES_TOKENIZER)}); "
                         f"a {arch} checkpoint has its own or none")
    if config is not None and arch not in TAKES_CONFIG:
        raise ValueError(f"config= is for checkpoints that lack part of their configuration "
                         f"({', '.join(TAKES_CONFIG)}); a {arch} checkpoint has all of it")
    extra = {"tokenizer": tokenizer} if arch in TAKES_TOKENIZER else {}
    if arch in TAKES_CONFIG:
        extra["config"] = config
    return CONVERTERS[arch](src, dtype, **extra)
