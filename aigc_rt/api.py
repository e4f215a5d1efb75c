"""load(): a runtime weights file (or an embedded default model, by short name) -> a ready model."""
from __future__ import annotations

import os

from . import archs
from . import format as fmt
from .backends import get_backend
from .errors import FormatError
from .tokenizer import checked_tokenizer

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
DEFAULT_TEXT_MODEL = "gpt2-tiny"
DEFAULT_IMAGE_MODEL = "dcgan-digits"  # and its discriminator, DEFAULT_IMAGE_MODEL + "-d"
DEFAULT_VAE = "vae-digits"


def embedded_models() -> list[str]:
    """Short names of the models shipped in aigc_rt/data."""
    if not os.path.isdir(DATA_DIR):
        return []
    return sorted(f[: -len(".safetensors")] for f in os.listdir(DATA_DIR) if f.endswith(".safetensors"))


def resolve_path(path) -> str:
    """None -> the embedded default text model; a short name -> that embedded model; else the path."""
    if path is None:
        path = DEFAULT_TEXT_MODEL
    path = os.fspath(path)
    embedded = os.path.join(DATA_DIR, path + ".safetensors")
    if not os.path.exists(path) and os.sep not in path and os.path.isfile(embedded):
        return embedded
    return path


def read_checked(path=None):
    """Open a runtime file (see format.py) and check everything load() needs, without building a model:
    -> (the file, its arch entry, its config, its Tokenizer or None for image models)."""
    rf = fmt.read(resolve_path(path), archs.expected)
    arch = archs.lookup(rf.arch)
    config = arch.config.from_dict(rf.config)
    tokenizer = None
    if arch.text:
        if rf.tokenizer is None:
            raise FormatError(f"{rf.path}: a {rf.arch} model needs a tokenizer in its metadata")
        tokenizer = checked_tokenizer(rf.tokenizer, config.vocab_size, rf.path)
    return rf, arch, config, tokenizer


def load(path=None, device="cpu", backend: str = "auto"):
    """Open a runtime file, check it (read_checked), and build its model on `device` with `backend`."""
    be = get_backend(backend, device)
    rf, arch, config, tokenizer = read_checked(path)
    return arch.model(config, rf.tensors, be, tokenizer, rf.dtype)
