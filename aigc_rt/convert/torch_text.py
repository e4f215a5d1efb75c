"""What the converters of torch.nn text models share (convert/lstm.py, convert/transformer_decoder.py): finding the
embedding and the output Linear around the model's body in a user's state_dict, and the vocabulary a state_dict
lacks."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from ..errors import FormatError
from ..tokenizer import char_tokenizer_json, checked_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # looked for beside the checkpoint


@dataclass
class Split:
    """A state_dict split into the model's body (its numbered layers) and the other modules."""
    layers: list[dict[str, torch.Tensor]]  # per layer index: name -> tensor
    prefix: str  # the body's module path, e.g. "rnn." or "decoder."
    start: int  # position of the body's first tensor in the state_dict
    other: dict[str, dict[str, torch.Tensor]]  # module -> {leaf: tensor}
    order: dict[str, int]  # module -> position of its first tensor


def split_state_dict(sd: dict[str, torch.Tensor], body_key: re.Pattern, src: str, body: str) -> Split:
    """body_key matches the body's tensors with the named groups prefix, index (the layer) and name."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    prefix, start, other, order = None, None, {}, {}
    for pos, (key, t) in enumerate(sd.items()):
        m = body_key.match(key)
        if m:
            if prefix not in (None, m["prefix"]):
                raise FormatError(f"{src}: {body} weights under two prefixes ({prefix!r}, {m['prefix']!r}); expected one")
            prefix, start = m["prefix"], pos if start is None else start
            layers.setdefault(int(m["index"]), {})[m["name"]] = t
        else:
            module, _, leaf = key.rpartition(".")
            other.setdefault(module, {})[leaf] = t
            order.setdefault(module, pos)
    if not layers:
        raise FormatError(f"{src}: no {body} weights in the state_dict")
    if sorted(layers) != list(range(len(layers))):
        raise FormatError(f"{src}: {body} layers {sorted(layers)} are not numbered 0..{len(layers) - 1}")
    return Split([layers[i] for i in range(len(layers))], prefix, start, other, order)


def embedding_and_head(split: Split, width_in: int, width_out: int, src: str, body: str, body_name: str):
    """Among a state_dict's modules besides the body, the embedding, a weight-only (V, width_in) module saved
    before the body, and the output Linear, (V, width_out) [+ (V,)] saved after it (modules save in the order
    __init__ creates them). FormatError if not exactly those. -> (embedding, head weight, head bias; zeros for a
    bias-free head), fp32."""
    other = split.other
    before = [m for m in other if split.order[m] < split.start]
    after = [m for m in other if split.order[m] > split.start]
    emb = [m for m in before if set(other[m]) == {"weight"} and other[m]["weight"].dim() == 2
           and other[m]["weight"].shape[1] == width_in]
    head = [m for m in after if set(other[m]) in ({"weight"}, {"weight", "bias"}) and other[m]["weight"].dim() == 2
            and other[m]["weight"].shape[1] == width_out]
    if len(emb) != 1 or len(head) != 1:
        shapes = ", ".join(f"{m}.{leaf} {list(t.shape)}" for m in other for leaf, t in other[m].items())
        raise FormatError(f"{src}: expected Embedding(V, {width_in}) -> {body} -> Linear({width_out}, V), with the "
                          f"embedding saved before {body_name} and the Linear after it; besides {body_name} found: "
                          f"{shapes or 'nothing'}")
    extra = sorted(set(other) - {emb[0], head[0]})
    if extra:
        raise FormatError(f"{src}: unexpected modules {extra} in an Embedding -> {body.split('(')[0]} -> Linear "
                          f"state_dict")
    wte, hw, hb = other[emb[0]]["weight"].float(), other[head[0]]["weight"].float(), other[head[0]].get("bias")
    V = wte.shape[0]
    if hw.shape[0] != V or (hb is not None and tuple(hb.shape) != (V,)):
        raise FormatError(f"{src}: the embedding has {V} rows but the output Linear {head[0]} makes "
                          f"{hw.shape[0]} logits (bias {None if hb is None else list(hb.shape)})")
    return wte, hw, torch.zeros(V) if hb is None else hb.float()


def read_tokenizer(src: str, tokenizer, vocab_size: int) -> str:
    """The tokenizers JSON to embed, from `tokenizer` (a path) or a tokenizer.json / vocab.json beside src,
    checked as load() will check it."""
    if tokenizer is None:
        found = [p for p in (os.path.join(os.path.dirname(os.path.abspath(src)), n) for n in TOKENIZER_FILES)
                 if os.path.isfile(p)]
        if not found:
            raise FormatError(f"{src}: a state_dict holds no vocabulary: pass tokenizer= (a tokenizers "
                              f"tokenizer.json, or a JSON list of the characters by id), or put tokenizer.json or "
                              f"vocab.json beside the checkpoint")
        tokenizer = found[0]
    path = os.fspath(tokenizer)
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: cannot read the tokenizer ({e})") from None
    tokenizer_json = json.dumps(value) if isinstance(value, dict) and "model" in value \
        else char_tokenizer_json(value, path)
    checked_tokenizer(tokenizer_json, vocab_size, path)
    return tokenizer_json
