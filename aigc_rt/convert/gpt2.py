"""Hugging Face GPT-2 checkpoint folder -> runtime tensors (kernel layout).

Owns every checkpoint quirk: Conv1D weights stored [in, out] (transposed here to [out, in]), an optional
`transformer.` prefix, the `attn.bias` / `attn.masked_bias` buffers (dropped), the tied `lm_head`
(dropped; the runtime reuses wte), weights in model.safetensors (optionally sharded) or pytorch_model.bin,
and the tokenizer from tokenizer.json or vocab.json + merges.txt.
"""
from __future__ import annotations

import json
import os

import torch

from ..config import GPT2Config
from ..errors import FormatError
from ..format import SCALE_SUFFIX, check_tensors, quantize_int8
from ..models.gpt2 import expected_tensors

# HF name (after the optional prefix) -> ours; Conv1D weights get transposed
_BLOCK_RENAMES = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
                  "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def is_hf_gpt2_dir(src: str) -> bool:
    return os.path.isdir(src) and os.path.isfile(os.path.join(src, "config.json"))


def read_config(src: str) -> GPT2Config:
    try:
        with open(os.path.join(src, "config.json")) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{src}: cannot read config.json ({e})") from None
    if hf.get("model_type") != "gpt2":
        raise FormatError(f"{src}: not a GPT-2 checkpoint (config.json model_type={hf.get('model_type')!r})")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise FormatError(f"{src}: activation_function {hf['activation_function']!r} is not supported "
                          f"(GPT-2 uses gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise FormatError(f"{src}: config option {flag}=true is not supported")
    if hf.get("scale_attn_weights", True) is not True:
        raise FormatError(f"{src}: scale_attn_weights=false is not supported")
    eos = hf.get("eos_token_id")
    values = {k: hf.get(k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")}
    if hf.get("layer_norm_epsilon") is not None:
        values["layer_norm_epsilon"] = hf["layer_norm_epsilon"]
    if isinstance(eos, int) and 0 <= eos < (values["vocab_size"] or 0):
        values["eos_token_id"] = eos
    try:
        return GPT2Config.from_dict(values)
    except FormatError as e:
        raise FormatError(f"{src}/config.json: {e}") from None


def read_state_dict(src: str) -> dict[str, torch.Tensor]:
    st, index, binf = (os.path.join(src, n) for n in
                       ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"))
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file
            return load_file(st)
        if os.path.isfile(index):
            from safetensors.torch import load_file
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for s in shards for k, v in load_file(os.path.join(src, s)).items()}
        if os.path.isfile(binf):
            sd = torch.load(binf, map_location="cpu", weights_only=True)
            return sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{src}: cannot read the checkpoint weights ({type(e).__name__}: {e})") from None
    raise FormatError(f"{src}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found")


def read_tokenizer(src: str) -> str:
    tj, vocab, merges = (os.path.join(src, n) for n in ("tokenizer.json", "vocab.json", "merges.txt"))
    if os.path.isfile(tj):
        with open(tj, encoding="utf-8") as f:
            return f.read()
    if os.path.isfile(vocab) and os.path.isfile(merges):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        tok = Tokenizer(models.BPE.from_file(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        with open(vocab, encoding="utf-8") as f:
            if "<|endoftext|>" in json.load(f):
                tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
        return tok.to_str()
    raise FormatError(f"{src}: no tokenizer (need tokenizer.json, or vocab.json and merges.txt)")


def convert_gpt2(src: str, dtype: str) -> tuple[dict, dict[str, torch.Tensor], str]:
    """-> (config dict, tensors in the file layout, tokenizer JSON)"""
    config = read_config(src)
    sd = read_state_dict(src)
    prefix = "transformer." if any(k.startswith("transformer.") for k in sd) else ""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key == "lm_head.weight":
            wte = sd.get(prefix + "wte.weight")
            if wte is None or wte.shape != t.shape or not torch.equal(wte, t):
                raise FormatError(f"{src}: lm_head.weight is not tied to wte.weight (untied GPT-2 heads are "
                                  f"not supported)")
            continue
        if not key.startswith(prefix):
            raise FormatError(f"{src}: unexpected tensor {key!r} in a GPT-2 checkpoint")
        name = key[len(prefix):]
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers, not weights
        out[_rename(name, src)] = _to_layout(name, t)
    spec = expected_tensors(config, dtype)  # matrices in `dtype`; biases and LayerNorm parameters in fp32
    for name in [k for k in out if k in spec and spec[k][1] == torch.int8]:
        out[name], out[name + SCALE_SUFFIX] = quantize_int8(out[name])
    out = {k: v.to(spec[k][1]).contiguous() if k in spec else v for k, v in out.items()}
    check_tensors({k: (tuple(v.shape), v.dtype) for k, v in out.items()}, spec, where=src)
    return config.to_dict(), out, read_tokenizer(src)


def _rename(name: str, src: str) -> str:
    if name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        return name
    parts = name.split(".")
    if parts[0] == "h" and len(parts) >= 4:
        module, leaf = ".".join(parts[2:-1]), parts[-1]
        if module in _BLOCK_RENAMES:
            return f"h.{parts[1]}.{_BLOCK_RENAMES[module]}.{leaf}"
    raise FormatError(f"{src}: unexpected tensor {name!r} in a GPT-2 checkpoint")


def _to_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    if name.endswith(".weight") and any(f".{m}." in name for m in _CONV1D) and t.dim() == 2:
        t = t.t()  # Conv1D [in, out] -> [out, in]
    return t.float()
