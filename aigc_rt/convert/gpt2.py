"""Hugging Face GPT-2 checkpoint folder -> runtime tensors (kernel layout).

Owns every checkpoint quirk: Conv1D weights stored [in, out] (transposed here to [out, in]), an optional
`transformer.` prefix, the `attn.bias` / `attn.masked_bias` buffers (dropped), the tied `lm_head`
(dropped; the runtime reuses wte), weights in model.safetensors (optionally sharded) or pytorch_model.bin,
and the tokenizer from tokenizer.json or vocab.json + merges.txt (checked as load() will check it). config.json
options the runtime does not implement (another MLP width or activation, other attention scalings,
cross-attention, an untied head) are rejected by name before any weights are read.
"""
from __future__ import annotations

import json
import os

import torch

from ..config import GPT2Config
from ..errors import FormatError, is_foreign_error
from ..format import to_file_layout
from ..models.gpt2 import expected_tensors
from ..tokenizer import checked_tokenizer

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
    _check_options(hf, src)
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


def _check_options(hf: dict, src: str) -> None:
    """Reject the HF GPT2Config options that change what the model computes to a value the runtime does not
    implement (it has a 4*n_embd GELU-tanh MLP, 1/sqrt(head_dim) attention scaling, no cross-attention and an
    lm_head tied to wte); dropout and training-only options do not matter at inference."""
    n_embd = hf.get("n_embd")
    supported = {  # option -> the values the runtime implements (an absent option takes HF's default)
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both GELU's tanh approximation
        "n_inner": (None, 4 * n_embd) if isinstance(n_embd, int) else (None,),  # None: 4 * n_embd
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "reorder_and_upcast_attn": (False,),
        "add_cross_attention": (False,),
        "tie_word_embeddings": (True,),
    }
    for option, allowed in supported.items():
        if option in hf and not any(hf[option] == a and type(hf[option]) is type(a) for a in allowed):
            raise FormatError(f"{src}/config.json: {option}={json.dumps(hf[option])} is not supported (aigc_rt "
                              f"implements {' or '.join(json.dumps(a) for a in allowed)})")


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


def read_tokenizer(src: str, config: GPT2Config) -> str:
    """The tokenizer JSON to embed, checked as load() will check it (a valid byte-level BPE `tokenizers` JSON
    with no more tokens than the model has embedding rows); FormatError naming the file(s) if not."""
    tj, vocab, merges = (os.path.join(src, n) for n in ("tokenizer.json", "vocab.json", "merges.txt"))
    if os.path.isfile(tj):
        where = tj
        try:
            with open(tj, encoding="utf-8") as f:
                tokenizer_json = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"{tj}: cannot read the tokenizer ({e})") from None
    elif os.path.isfile(vocab) and os.path.isfile(merges):
        where = f"{vocab} + {merges}"
        tokenizer_json = _bpe_tokenizer_json(vocab, merges, where)
    else:
        raise FormatError(f"{src}: no tokenizer (need tokenizer.json, or vocab.json and merges.txt)")
    checked_tokenizer(tokenizer_json, config.vocab_size, where)
    return tokenizer_json


def _bpe_tokenizer_json(vocab: str, merges: str, where: str) -> str:
    """GPT-2's byte-level BPE tokenizer from vocab.json + merges.txt, as `tokenizers` JSON."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    try:
        tok = HFTokenizer(models.BPE.from_file(vocab, merges))
        with open(vocab, encoding="utf-8") as f:
            has_eot = "<|endoftext|>" in json.load(f)
    except BaseException as e:  # `tokenizers` raises plain Exceptions (or Rust panics) for bad files
        if not is_foreign_error(e):
            raise
        raise FormatError(f"{where}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if has_eot:
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return tok.to_str()


def convert_gpt2(src: str, dtype: str) -> tuple[dict, dict[str, torch.Tensor], str]:
    """-> (config dict, tensors in the file layout, tokenizer JSON)"""
    config = read_config(src)
    tokenizer_json = read_tokenizer(src, config)
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
    # matrices in `dtype`; biases and LayerNorm parameters in fp32
    return config.to_dict(), to_file_layout(out, expected_tensors(config, dtype), src), tokenizer_json


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
