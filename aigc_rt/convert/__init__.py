"""Checkpoint converters: a source checkpoint -> one runtime .safetensors file (see format.py)."""
from __future__ import annotations

import functools
import os

from .. import format as fmt
from ..errors import FormatError
from .dcgan import VARIANTS as DCGAN_VARIANTS
from .dcgan import convert_dcgan, is_torch_checkpoint
from .dcgan import detect_arch as detect_dcgan_arch
from .gpt2 import convert_gpt2, is_hf_gpt2_dir


def _gpt2(src: str, dtype: str):
    return ("gpt2", *convert_gpt2(src, dtype))


def _dcgan(src: str, dtype: str, variant: str):
    return (*convert_dcgan(src, dtype, variant), None)


# arch -> converter(src, dtype) -> (runtime arch, config dict, tensors, tokenizer JSON or None)
CONVERTERS = {"gpt2": _gpt2, **{v: functools.partial(_dcgan, variant=v) for v in DCGAN_VARIANTS}}


def detect_arch(src: str) -> str:
    if is_hf_gpt2_dir(src):
        return "gpt2"
    if is_torch_checkpoint(src):
        return detect_dcgan_arch(src)
    if not os.path.exists(src):
        raise FormatError(f"{src}: no such file or directory")
    raise FormatError(f"{src}: cannot tell what this checkpoint is (expected a Hugging Face GPT-2 folder with "
                      f"config.json, or a DCGAN state_dict .pt/.pth/.safetensors); pass arch= to say")


def convert(src, dst, arch: str | None = None, dtype: str = "fp32") -> str:
    """Convert checkpoint `src` to the runtime file `dst`; returns dst."""
    src, dst = os.fspath(src), os.fspath(dst)
    if dtype not in fmt.DTYPES:
        raise ValueError(f"dtype must be one of {sorted(fmt.DTYPES)}, got {dtype!r}")
    arch = arch or detect_arch(src)
    if arch not in CONVERTERS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(CONVERTERS)}")
    if not os.path.exists(src):
        raise FormatError(f"{src}: no such file or directory")
    runtime_arch, config, tensors, tokenizer = CONVERTERS[arch](src, dtype)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    fmt.save(dst, runtime_arch, dtype, config, tensors, tokenizer)
    return dst
