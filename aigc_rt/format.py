"""The runtime weights file: one .safetensors file whose metadata says what it holds.

    __metadata__ = {"format": "aigc-rt", "format_version": "1", "arch": "gpt2" | "dcgan" | ...,
                    "dtype": "fp32" | "bf16" | "fp16" | "int8", "config": <JSON>, "tokenizer": <JSON, text models>}

Tensors are stored in the layout the kernels want, so loading does no reshuffling. `dtype` is the dtype of
the weight matrices; biases and norm parameters stay fp32. "int8" is weight-only symmetric quantisation
with one fp32 scale per output channel (per row of the (out, in) matrix): the matrix `NAME` is stored as
int8 q and `NAME_scale` (out,) fp32 beside it, with NAME = q * NAME_scale[:, None] (see quantize_int8);
the other tensors are as in the fp32 file. Everything is checked before use; any problem raises
FormatError naming it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import FormatError, is_foreign_error

FORMAT = "aigc-rt"
FORMAT_VERSION = "1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
SCALE_SUFFIX = "_scale"  # int8 files: the per-output-channel scales of matrix NAME are NAME + SCALE_SUFFIX
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8,
              "F64": torch.float64, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8}

# name -> (shape, dtype): what an arch expects to find in a file
TensorSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass
class RuntimeFile:
    path: str
    arch: str
    dtype: str
    config: dict
    tokenizer: str | None  # the `tokenizers` JSON, for text models
    tensors: dict[str, torch.Tensor]


def save(path: str | os.PathLike, arch: str, dtype: str, config: dict, tensors: dict[str, torch.Tensor],
         tokenizer: str | None = None) -> None:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch, "dtype": dtype,
            "config": json.dumps(config, sort_keys=True)}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.fspath(path), metadata=meta)


def read(path: str | os.PathLike, expected: "callable[[str, str, dict], TensorSpec]") -> RuntimeFile:
    """Open and validate a runtime file. `expected(arch, dtype, config)` gives the tensors that must be
    there (it raises FormatError for an unknown arch or a bad config)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such file")
    if os.path.isdir(path):
        raise FormatError(f"{path}: is a directory, not an aigc-rt weights file (convert a checkpoint folder "
                          f"with `aigc-rt convert`)")
    try:
        handle = safe_open(path, framework="pt")
    except BaseException as e:  # safetensors raises its own error types for every header problem
        if not is_foreign_error(e):
            raise
        raise FormatError(f"{path}: not a valid safetensors file ({type(e).__name__}: {e})") from None
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise FormatError(f"{path}: a safetensors file, but not an aigc-rt one (metadata format="
                              f"{meta.get('format')!r}); convert the checkpoint with `aigc-rt convert` first")
        if meta.get("format_version") != FORMAT_VERSION:
            raise FormatError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                              f"(this aigc_rt reads version {FORMAT_VERSION})")
        arch, dtype = meta.get("arch"), meta.get("dtype")
        if dtype not in DTYPES:
            raise FormatError(f"{path}: unknown dtype {dtype!r} (expected one of {sorted(DTYPES)})")
        try:
            config = json.loads(meta.get("config", ""))
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}: metadata 'config' is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise FormatError(f"{path}: metadata 'config' must be a JSON object")
        try:
            spec = expected(arch, dtype, config)
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None

        found = {}
        for name in f.keys():
            sl = f.get_slice(name)
            found[name] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()))
        check_tensors(found, spec, where=path)
        try:
            tensors = {name: f.get_tensor(name) for name in spec}
        except BaseException as e:
            if not is_foreign_error(e):
                raise
            raise FormatError(f"{path}: cannot read tensor data ({type(e).__name__}: {e})") from None
    for name, t in tensors.items():  # symmetric int8: -128 has no positive twin (and the AVX2 kernel negates q)
        if t.dtype == torch.int8 and t.numel() and int(t.min()) == -128:
            raise FormatError(f"{path}: int8 tensor '{name}' holds -128; symmetric int8 weights lie in [-127, 127] "
                              f"(re-convert with aigc-rt convert --dtype int8)")
    return RuntimeFile(path, arch, dtype, config, meta.get("tokenizer"), tensors)


def check_tensors(found: dict[str, tuple], spec: TensorSpec, where: str) -> None:
    """Every expected tensor present with its shape and dtype, and nothing else."""
    missing = sorted(set(spec) - set(found))
    if missing:
        raise FormatError(f"{where}: missing tensor(s) {_short(missing)}")
    extra = sorted(set(found) - set(spec))
    if extra:
        raise FormatError(f"{where}: unexpected tensor(s) {_short(extra)}")
    for name, (shape, dtype) in spec.items():
        got_shape, got_dtype = found[name]
        if tuple(got_shape) != tuple(shape):
            raise FormatError(f"{where}: tensor '{name}' has shape {list(got_shape)}, expected {list(shape)}")
        if got_dtype != dtype:
            raise FormatError(f"{where}: tensor '{name}' has dtype {got_dtype}, expected {dtype}")


def add_matrix(spec: TensorSpec, name: str, shape: tuple[int, int], dtype: str) -> None:
    """Expect a weight matrix in a file of `dtype`: in that dtype, and for int8 with its (rows,) fp32 scale beside."""
    spec[name] = (shape, DTYPES[dtype])
    if dtype == "int8":
        spec[name + SCALE_SUFFIX] = ((shape[0],), torch.float32)


def to_file_layout(tensors: dict[str, torch.Tensor], spec: TensorSpec, where: str) -> dict[str, torch.Tensor]:
    """A converter's fp32 tensors in the dtypes `spec` expects (int8 matrices quantized, with their scales), checked
    against it (check_tensors: FormatError naming what is missing, extra or misshapen)."""
    out = dict(tensors)
    for name in [k for k in out if k in spec and spec[k][1] == torch.int8]:
        out[name], out[name + SCALE_SUFFIX] = quantize_int8(out[name])
    out = {k: v.to(spec[k][1]).contiguous() if k in spec else v for k, v in out.items()}
    check_tensors({k: (tuple(v.shape), v.dtype) for k, v in out.items()}, spec, where=where)
    return out


def owned(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor a model keeps as it was read (a bias, a norm, an embedding table), in memory of its own. Tensors read
    from a weights file are views of its memory map, and while one view lives the whole mapping stays in the process,
    with every page the loader touched counted in its RSS (twice the model, for the matrices a backend repacked).
    A tensor on another device is already a copy; None stays None."""
    return t.clone() if t is not None and t.device.type == "cpu" else t


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (out, in) float -> q (out, in) int8 in [-127, 127], scale (out,) fp32 with
    w ~= q * scale[:, None]; scale = max |w_row| / 127 (0 for an all-zero row), q = round(w / scale)."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127  # (out,)
    q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (out, in) int8, scale (out,) fp32 -> (out, in) fp32."""
    return q.float() * scale[:, None]


def _short(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
