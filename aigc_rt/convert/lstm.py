"""PyTorch state_dict of the seed LSTM text generator -> runtime tensors, config and tokenizer.

    Embedding(V, E) -> LSTM(E, H, L) -> Linear(H, V)        (any module names; batch_first does not matter)

Owns every checkpoint quirk:
- the module names are the user's: the LSTM is found by torch's parameter names (`weight_ih_l0`, ...), the
  embedding and the output Linear by their shapes and by where they sit in the state_dict (modules register,
  and so save, in the order __init__ creates them: the embedding before the LSTM, the Linear after it);
- an LSTM without biases (bias=False) gets zero biases; torch's two bias vectors are summed (in float64) into
  one, added by the input linear;
- bidirectional LSTMs and projections (proj_size) are refused by name: a left-to-right generator has neither;
- .pt / .pth / .safetensors files, DataParallel's `module.` prefix (read_state_dict, shared with the DCGAN
  converter).
The vocabulary a state_dict lacks comes from `tokenizer`: a `tokenizers` tokenizer.json, or a character
vocabulary (a JSON list of one-character strings, id = index, or a JSON object {character: id}: the usual
char-RNN `chars` / `char_to_idx`), found beside the checkpoint as tokenizer.json / vocab.json when not given.
"""
from __future__ import annotations

import json
import os
import re

import torch

from ..config import LSTMConfig
from ..errors import FormatError
from ..format import SCALE_SUFFIX, check_tensors, quantize_int8
from ..models.lstm import expected_tensors
from ..tokenizer import char_tokenizer_json, checked_tokenizer
from .dcgan import read_state_dict

_LSTM_KEY = re.compile(r"^(.*?)(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # looked for beside the checkpoint


def is_lstm_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    return any(_LSTM_KEY.match(k) and k.endswith("weight_ih_l0") for k in sd)


def _parse(sd: dict[str, torch.Tensor], src: str):
    """-> (config without eos, embedding weight, [(W_ih, W_hh, b_ih + b_hh)] per layer, head weight, head bias)."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    lstm_prefix, order, first_lstm, other = None, {}, None, {}
    for pos, (key, t) in enumerate(sd.items()):
        m = _LSTM_KEY.match(key)
        if m:
            prefix, kind, idx, reverse = m.groups()
            if reverse:
                raise FormatError(f"{src}: {key}: a bidirectional LSTM cannot generate text left to right")
            if kind == "weight_hr":
                raise FormatError(f"{src}: {key}: LSTMs with projections (proj_size > 0) are not supported")
            if lstm_prefix not in (None, prefix):
                raise FormatError(f"{src}: LSTM weights under two prefixes ({lstm_prefix!r}, {prefix!r}); "
                                  f"expected one nn.LSTM")
            lstm_prefix, first_lstm = prefix, pos if first_lstm is None else first_lstm
            layers.setdefault(int(idx), {})[kind] = t
        else:
            module, _, leaf = key.rpartition(".")
            other.setdefault(module, {})[leaf] = t
            order.setdefault(module, pos)
    if not layers:
        raise FormatError(f"{src}: no LSTM weights (weight_ih_l0, ...) in the state_dict")
    if sorted(layers) != list(range(len(layers))):
        raise FormatError(f"{src}: LSTM layers {sorted(layers)} are not numbered 0..{len(layers) - 1}")
    w0 = layers[0].get("weight_ih")
    if w0 is None or w0.dim() != 2 or w0.shape[0] % 4:
        raise FormatError(f"{src}: {lstm_prefix}weight_ih_l0 must be (4 * hidden, input), got "
                          f"{None if w0 is None else list(w0.shape)}")
    H, E = w0.shape[0] // 4, w0.shape[1]
    cells = []
    for i in range(len(layers)):
        g, name = layers[i], f"{lstm_prefix}*_l{i}"
        want = {"weight_ih": (4 * H, E if i == 0 else H), "weight_hh": (4 * H, H), "bias_ih": (4 * H,),
                "bias_hh": (4 * H,)}
        if "weight_ih" not in g or "weight_hh" not in g or ("bias_ih" in g) != ("bias_hh" in g):
            raise FormatError(f"{src}: LSTM layer {i} lacks {sorted(set(want) - set(g))}")
        for kind, t in g.items():
            if tuple(t.shape) != want[kind]:
                raise FormatError(f"{src}: {name.replace('*', kind)} has shape {list(t.shape)}, expected "
                                  f"{list(want[kind])} (hidden {H}, input {E if i == 0 else H})")
        bias = (g["bias_ih"].double() + g["bias_hh"].double()).float() if "bias_ih" in g else torch.zeros(4 * H)
        cells.append((g["weight_ih"].float(), g["weight_hh"].float(), bias))

    # the embedding: a weight-only module of width E saved before the LSTM; the head: (V, H) [+ (V,)] after it
    before = [m for m in other if order[m] < first_lstm]
    after = [m for m in other if order[m] > first_lstm]
    emb = [m for m in before if set(other[m]) == {"weight"} and other[m]["weight"].dim() == 2
           and other[m]["weight"].shape[1] == E]
    head = [m for m in after if set(other[m]) in ({"weight"}, {"weight", "bias"}) and other[m]["weight"].dim() == 2
            and other[m]["weight"].shape[1] == H]
    if len(emb) != 1 or len(head) != 1:
        shapes = ", ".join(f"{m}.{leaf} {list(t.shape)}" for m in other for leaf, t in other[m].items())
        raise FormatError(f"{src}: expected Embedding(V, {E}) -> LSTM({E}, {H}, {len(layers)}) -> Linear({H}, V), "
                          f"with the embedding saved before the LSTM and the Linear after it; besides the LSTM "
                          f"found: {shapes or 'nothing'}")
    extra = sorted(set(other) - {emb[0], head[0]})
    if extra:
        raise FormatError(f"{src}: unexpected modules {extra} in an Embedding -> LSTM -> Linear state_dict")
    wte, hw = other[emb[0]]["weight"].float(), other[head[0]]["weight"].float()
    hb = other[head[0]].get("bias")
    V = wte.shape[0]
    if hw.shape[0] != V or (hb is not None and tuple(hb.shape) != (V,)):
        raise FormatError(f"{src}: the embedding has {V} rows but the output Linear {head[0]} makes "
                          f"{hw.shape[0]} logits (bias {None if hb is None else list(hb.shape)})")
    try:
        config = LSTMConfig(vocab_size=V, n_embd=E, hidden_size=H, n_layer=len(layers))
    except FormatError as e:
        raise FormatError(f"{src}: {e}") from None
    return config, wte, cells, hw, (torch.zeros(V) if hb is None else hb.float())


def read_tokenizer(src: str, tokenizer, vocab_size: int) -> str:
    """The tokenizers JSON to embed, from `tokenizer` (a path) or a tokenizer.json / vocab.json beside src,
    checked as load() will check it."""
    if tokenizer is None:
        found = [p for p in (os.path.join(os.path.dirname(os.path.abspath(src)), n) for n in TOKENIZER_FILES)
                 if os.path.isfile(p)]
        if not found:
            raise FormatError(f"{src}: an LSTM state_dict holds no vocabulary: pass tokenizer= (a tokenizers "
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


def convert_lstm(src: str, dtype: str, tokenizer=None) -> tuple[dict, dict[str, torch.Tensor], str]:
    """-> (config dict, tensors in the file layout, tokenizer JSON)"""
    config, wte, cells, head_w, head_b = _parse(read_state_dict(src), src)
    tokenizer_json = read_tokenizer(src, tokenizer, config.vocab_size)
    out = {"wte.weight": wte, "lm_head.weight": head_w, "lm_head.bias": head_b}
    for i, (w_ih, w_hh, b) in enumerate(cells):
        out[f"layers.{i}.ih.weight"], out[f"layers.{i}.hh.weight"], out[f"layers.{i}.bias"] = w_ih, w_hh, b
    spec = expected_tensors(config, dtype)  # matrices in `dtype`; biases fp32
    for name in [k for k in out if spec[k][1] == torch.int8]:
        out[name], out[name + SCALE_SUFFIX] = quantize_int8(out[name])
    out = {k: v.to(spec[k][1]).contiguous() for k, v in out.items()}
    check_tensors({k: (tuple(v.shape), v.dtype) for k, v in out.items()}, spec, where=src)
    return config.to_dict(), out, tokenizer_json


class ReferenceLSTM(torch.nn.Module):
    """The seed system as torch.nn runs it: ids (T, B) -> logits (T, B, V), sequence-first."""

    def __init__(self, vocab_size: int, n_embd: int, hidden_size: int, n_layer: int):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, n_embd)
        self.lstm = torch.nn.LSTM(n_embd, hidden_size, n_layer)
        self.fc = torch.nn.Linear(hidden_size, vocab_size)

    def forward(self, ids: torch.Tensor, state=None):
        y, state = self.lstm(self.embedding(ids), state)
        return self.fc(y), state


def reference_module(src: str) -> ReferenceLSTM:
    """The checkpoint as the eval-mode torch module it came from (biases as saved, not summed): what
    `aigc-rt validate` compares a converted file with."""
    sd = read_state_dict(src)
    config, wte, cells, head_w, head_b = _parse(sd, src)
    ref = ReferenceLSTM(config.vocab_size, config.n_embd, config.hidden_size, config.n_layer)
    lstm = {k: v for k, v in sd.items() if _LSTM_KEY.match(k)}
    prefix = _LSTM_KEY.match(next(iter(lstm))).group(1)
    state = {"embedding.weight": wte, "fc.weight": head_w, "fc.bias": head_b,
             **{"lstm." + k[len(prefix):]: v.float() for k, v in lstm.items()}}
    for i in range(config.n_layer):  # bias=False checkpoints: zero biases
        for kind in ("bias_ih", "bias_hh"):
            state.setdefault(f"lstm.{kind}_l{i}", torch.zeros(4 * config.hidden_size))
    ref.load_state_dict(state)
    return ref.eval()
