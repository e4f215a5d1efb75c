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

import re

import torch

from ..config import LSTMConfig
from ..errors import FormatError
from ..format import to_file_layout
from ..models.lstm import expected_tensors
from .dcgan import read_state_dict
from .torch_text import embedding_and_head, read_tokenizer, split_state_dict

_LSTM_KEY = re.compile(r"^(?P<prefix>.*?)(?P<name>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(?P<index>\d+)"
                       r"(?P<reverse>_reverse)?$")


def is_lstm_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    return any(_LSTM_KEY.match(k) and k.endswith("weight_ih_l0") for k in sd)


def _parse(sd: dict[str, torch.Tensor], src: str):
    """-> (config without eos, embedding weight, [(W_ih, W_hh, b_ih + b_hh)] per layer, head weight, head bias)."""
    for key in sd:
        m = _LSTM_KEY.match(key)
        if m and m["reverse"]:
            raise FormatError(f"{src}: {key}: a bidirectional LSTM cannot generate text left to right")
        if m and m["name"] == "weight_hr":
            raise FormatError(f"{src}: {key}: LSTMs with projections (proj_size > 0) are not supported")
    split = split_state_dict(sd, _LSTM_KEY, src, "LSTM (weight_ih_l0, ...)")
    layers, lstm_prefix = split.layers, split.prefix
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
    wte, hw, hb = embedding_and_head(split, E, H, src, f"LSTM({E}, {H}, {len(layers)})", "the LSTM")
    V = wte.shape[0]
    try:
        config = LSTMConfig(vocab_size=V, n_embd=E, hidden_size=H, n_layer=len(layers))
    except FormatError as e:
        raise FormatError(f"{src}: {e}") from None
    return config, wte, cells, hw, hb


def convert_lstm(src: str, dtype: str, tokenizer=None) -> tuple[dict, dict[str, torch.Tensor], str]:
    """-> (config dict, tensors in the file layout, tokenizer JSON)"""
    config, wte, cells, head_w, head_b = _parse(read_state_dict(src), src)
    tokenizer_json = read_tokenizer(src, tokenizer, config.vocab_size)
    out = {"wte.weight": wte, "lm_head.weight": head_w, "lm_head.bias": head_b}
    for i, (w_ih, w_hh, b) in enumerate(cells):
        out[f"layers.{i}.ih.weight"], out[f"layers.{i}.hh.weight"], out[f"layers.{i}.bias"] = w_ih, w_hh, b
    # matrices in `dtype`; biases fp32
    return config.to_dict(), to_file_layout(out, expected_tensors(config, dtype), src), tokenizer_json


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
