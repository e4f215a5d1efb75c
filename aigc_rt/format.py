"""The runtime weights file: one .safetensors file whose metadata says what it holds.

    __metadata__ = {"format": "aigc-rt", "format_version": "1", "arch": "gpt2" | "dcgan" | ...,
                    "dtype": "fp32" | "bf16" | "fp16" | "int8" | "int4", "config": <JSON>,
                    "tokenizer": <JSON, text models>}

Tensors are stored in the layout the kernels want, so loading does no reshuffling. `dtype` is the dtype of
the weight matrices; biases and norm parameters stay fp32. "int8" is weight-only symmetric quantisation
with one fp32 scale per output channel (per row of the (out, in) matrix): the matrix `NAME` is stored as
int8 q and `NAME_scale` (out,) fp32 beside it, with NAME = q * NAME_scale[:, None] (see quantize_int8);
the other tensors are as in the fp32 file. "int4" is weight-only symmetric quantisation per group of 64 inputs
(llama.cpp's q4_0 levels, with fp32 scales): each linear's matrix `NAME` (out, in), in even, is stored as uint8
(out, in / 2), byte j holding u = q + 8 of inputs 2j (low nibble) and 2j + 1 (high nibble), q in [-8, 7], and
`NAME_scale` (out, ceil(in / 64)) fp32 beside it, with NAME[o, k] = q[o, k] * NAME_scale[o, k // 64] (see
quantize_int4); 4.5 bits a weight. Embedding tables, which are indexed rather than streamed (and GPT-2's wte,
which is also its lm_head, the matrix where rounding costs the most), stay int8 in an int4 file. Everything is
checked before use; any problem raises FormatError naming it.
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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8,
          "int4": torch.uint8}  # file dtype -> the dtype its (linear) matrices are stored in
SCALE_SUFFIX = "_scale"  # int8 and int4 files: the scales of matrix NAME are NAME + SCALE_SUFFIX
INT4_GROUP = 64  # int4: inputs per scale
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


def is_runtime_file(path: str) -> bool:
    """Whether `path` is a safetensors file whose metadata says it is an aigc-rt one (read() checks the rest)."""
    if not os.path.isfile(path):
        return False
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except BaseException as e:
        if not is_foreign_error(e):
            raise
        return False


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
    """Expect a linear's weight matrix (out, in) in a file of `dtype`: in that dtype, for int8 with its (out,) fp32
    scale beside, for int4 as nibble pairs (out, in / 2) uint8 with its (out, ceil(in / 64)) fp32 scales."""
    out, n_in = shape
    if dtype == "int4":
        if n_in % 2:
            raise FormatError(f"int4 matrices need an even number of inputs; '{name}' has {n_in} (use int8)")
        spec[name] = ((out, n_in // 2), torch.uint8)
        spec[name + SCALE_SUFFIX] = ((out, -(-n_in // INT4_GROUP)), torch.float32)
        return
    spec[name] = (shape, DTYPES[dtype])
    if dtype == "int8":
        spec[name + SCALE_SUFFIX] = ((out,), torch.float32)


def add_embedding(spec: TensorSpec, name: str, shape: tuple[int, int], dtype: str) -> None:
    """Expect an embedding table (rows, width) in a file of `dtype`, as add_matrix; int4 files keep it int8 (the
    embedding kernels gather int8 rows; a table that is also the lm_head is where 4-bit rounding costs the most)."""
    add_matrix(spec, name, shape, "int8" if dtype == "int4" else dtype)


def to_file_layout(tensors: dict[str, torch.Tensor], spec: TensorSpec, where: str) -> dict[str, torch.Tensor]:
    """A converter's fp32 tensors in the dtypes `spec` expects (int8 and int4 matrices quantized, with their scales),
    checked against it (check_tensors: FormatError naming what is missing, extra or misshapen)."""
    out = dict(tensors)
    for name in [k for k in out if k in spec and spec[k][1] in (torch.int8, torch.uint8)]:
        quantize = quantize_int8 if spec[name][1] == torch.int8 else quantize_int4
        out[name], out[name + SCALE_SUFFIX] = quantize(out[name])
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


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per group of INT4_GROUP inputs (llama.cpp's q4_0 levels): (out, in) float, in even ->
    packed (out, in / 2) uint8, scale (out, ceil(in / 64)) fp32. Per group, d = -m / 8 where m is the group's
    value of largest magnitude (so m itself maps to q = -8 exactly and the 16 levels are all used), q =
    clamp(round(w / d), -8, 7), u = q + 8; byte j of a row holds u of inputs 2j (low nibble) and 2j + 1 (high)."""
    w = w.float()
    out, n_in = w.shape
    if n_in % 2:
        raise ValueError(f"int4 quantisation needs an even number of inputs, got a ({out}, {n_in}) matrix")
    groups = -(-n_in // INT4_GROUP)
    g = torch.nn.functional.pad(w, (0, groups * INT4_GROUP - n_in)).reshape(out, groups, INT4_GROUP)
    m = g.gather(2, g.abs().argmax(2, keepdim=True)).squeeze(2)  # (out, groups), signed
    scale = m / -8
    q = torch.round(g / torch.where(scale != 0, scale, 1.0)[..., None]).clamp(-8, 7)
    u = (q.reshape(out, -1)[:, :n_in] + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4), scale.contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed (out, in / 2) uint8 nibble pairs -> u = q + 8 (out, in) uint8, in input order."""
    return torch.stack((packed & 15, packed >> 4), dim=2).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """packed (out, in / 2) uint8 nibble pairs, scale (out, ceil(in / 64)) fp32 -> (out, in) fp32."""
    u = unpack_int4(packed)
    return (u.float() - 8) * scale.repeat_interleave(INT4_GROUP, dim=1)[:, :u.shape[1]]


def _short(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
