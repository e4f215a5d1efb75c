"""PyTorch state_dict of the seed Transformer decoder text model -> runtime tensors, config and tokenizer.

    Embedding(V, d) -> nn.TransformerDecoder(nn.TransformerDecoderLayer(d, n_head, d_ff), L) -> Linear(d, V)

Owns every checkpoint quirk:
- the module names are the user's: the decoder is found by nn.TransformerDecoder's parameter names
  (`layers.<i>.self_attn.in_proj_weight`, ...), the embedding and the output Linear by their shapes and by where
  they sit in the state_dict (saved in the order __init__ creates them: the embedding before the decoder, the
  Linear after it), as for the LSTM;
- nn.MultiheadAttention's packed in_proj (q, k, v rows): the self-attention keeps it whole, the cross-attention's
  is split into q (applied to the stream) and k, v (applied to the memory); missing biases (bias=False) are zeros;
- the TransformerDecoder's optional final `norm`;
- what a state_dict does not hold, given as `config` (convert(..., config={...}), `aigc-rt convert --n-head`):
  n_head (required: it does not change any shape), norm_first (default False, torch's default) and
  layer_norm_eps (default 1e-5). The feed-forward must be torch's default ReLU (a GELU one has the same tensors:
  the converter cannot tell, so say so with activation="gelu" and it refuses).
The vocabulary comes as for the LSTM (convert/torch_text.py read_tokenizer).
"""
from __future__ import annotations

import re

import torch

from ..config import TransformerDecoderConfig
from ..errors import FormatError
from ..format import to_file_layout
from ..models.transformer_decoder import NORMS, expected_tensors
from .dcgan import read_state_dict
from .torch_text import embedding_and_head, read_tokenizer, split_state_dict

_LAYER_KEY = re.compile(r"^(?P<prefix>.*?)layers\.(?P<index>\d+)\."
                        r"(?P<name>(?P<module>self_attn|multihead_attn|linear1|linear2|norm1|norm2|norm3)\..+)$")
OPTIONS = {"n_head": int, "norm_first": bool, "layer_norm_eps": float, "activation": str}  # config= keys


def is_transformer_decoder_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    return any((m := _LAYER_KEY.match(k)) and m["module"] == "multihead_attn" for k in sd)


def _check_options(config: dict | None, src: str) -> dict:
    config = dict(config or {})
    unknown = sorted(set(config) - set(OPTIONS))
    if unknown:
        raise ValueError(f"config: unknown option(s) {unknown} for a transformer_decoder checkpoint; known: "
                         f"{sorted(OPTIONS)}")
    for k, v in config.items():
        if isinstance(v, bool) != (OPTIONS[k] is bool) or not isinstance(v, (int, float) if OPTIONS[k] is float
                                                                          else OPTIONS[k]):
            raise ValueError(f"config: {k} must be {OPTIONS[k].__name__}, got {v!r}")
    if "n_head" not in config:
        raise FormatError(f"{src}: a state_dict does not say how many attention heads the layers have: pass "
                          f"config={{'n_head': ...}} (aigc-rt convert --n-head N)")
    if config.pop("activation", "relu") != "relu":
        raise FormatError(f"{src}: only the ReLU feed-forward (nn.TransformerDecoderLayer's default) is supported")
    return config


def _parse(sd: dict[str, torch.Tensor], options: dict, src: str):
    """-> (config, {runtime name: fp32 tensor}) with the cross-attention's in_proj split and biases filled in."""
    split = split_state_dict(sd, _LAYER_KEY, src, "nn.TransformerDecoder (layers.0.self_attn.in_proj_weight, ...)")
    layers, prefix, other = split.layers, split.prefix, split.other
    g0 = layers[0]
    w = g0.get("self_attn.in_proj_weight")
    if w is None or w.dim() != 2 or w.shape[0] != 3 * w.shape[1]:
        separate = any(k.startswith("self_attn.q_proj_weight") for k in g0)
        raise FormatError(f"{src}: {prefix}layers.0.self_attn" + (
            " has separate q/k/v projections (kdim/vdim != embed_dim): not supported" if separate else
            f".in_proj_weight must be (3 * d_model, d_model), got {None if w is None else list(w.shape)}"))
    d = w.shape[1]
    fc1 = g0.get("linear1.weight")
    if fc1 is None or fc1.dim() != 2 or fc1.shape[1] != d:
        raise FormatError(f"{src}: {prefix}layers.0.linear1.weight must be (d_ff, {d}), got "
                          f"{None if fc1 is None else list(fc1.shape)}")
    d_ff = fc1.shape[0]

    def get(g, i, name, shape, default_zero=False):
        t = g.get(name)
        if t is None:
            if default_zero:
                return torch.zeros(shape)
            raise FormatError(f"{src}: {prefix}layers.{i}.{name} is missing")
        if tuple(t.shape) != tuple(shape):
            raise FormatError(f"{src}: {prefix}layers.{i}.{name} has shape {list(t.shape)}, expected {list(shape)}")
        return t.float()

    tensors = {}
    for i, g in enumerate(layers):
        L = f"layers.{i}."
        known = {f"{a}.{b}" for a in ("self_attn", "multihead_attn") for b in
                 ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")} | \
            {f"{m}.{leaf}" for m in ("linear1", "linear2", *NORMS) for leaf in ("weight", "bias")}
        if set(g) - known:
            raise FormatError(f"{src}: unexpected tensors in decoder layer {i}: {sorted(set(g) - known)}")
        tensors[L + "self_attn.qkv.weight"] = get(g, i, "self_attn.in_proj_weight", (3 * d, d))
        tensors[L + "self_attn.qkv.bias"] = get(g, i, "self_attn.in_proj_bias", (3 * d,), True)
        tensors[L + "self_attn.proj.weight"] = get(g, i, "self_attn.out_proj.weight", (d, d))
        tensors[L + "self_attn.proj.bias"] = get(g, i, "self_attn.out_proj.bias", (d,), True)
        cw = get(g, i, "multihead_attn.in_proj_weight", (3 * d, d))
        cb = get(g, i, "multihead_attn.in_proj_bias", (3 * d,), True)
        tensors[L + "cross_attn.q.weight"], tensors[L + "cross_attn.kv.weight"] = cw[:d], cw[d:]
        tensors[L + "cross_attn.q.bias"], tensors[L + "cross_attn.kv.bias"] = cb[:d], cb[d:]
        tensors[L + "cross_attn.proj.weight"] = get(g, i, "multihead_attn.out_proj.weight", (d, d))
        tensors[L + "cross_attn.proj.bias"] = get(g, i, "multihead_attn.out_proj.bias", (d,), True)
        tensors[L + "fc1.weight"] = get(g, i, "linear1.weight", (d_ff, d))
        tensors[L + "fc1.bias"] = get(g, i, "linear1.bias", (d_ff,), True)
        tensors[L + "fc2.weight"] = get(g, i, "linear2.weight", (d, d_ff))
        tensors[L + "fc2.bias"] = get(g, i, "linear2.bias", (d,), True)
        for n in NORMS:
            tensors[L + n + ".weight"] = get(g, i, n + ".weight", (d,))
            tensors[L + n + ".bias"] = get(g, i, n + ".bias", (d,), True)

    final = other.pop(prefix + "norm", None)  # TransformerDecoder(norm=LayerNorm(d))
    if final is not None:
        if "weight" not in final or tuple(final["weight"].shape) != (d,) or set(final) - {"weight", "bias"}:
            raise FormatError(f"{src}: {prefix}norm must be a LayerNorm({d})")
        tensors["norm.weight"], tensors["norm.bias"] = final["weight"].float(), final.get("bias", torch.zeros(d)).float()
    wte, hw, hb = embedding_and_head(split, d, d, src, "TransformerDecoder", "the decoder")
    tensors.update({"wte.weight": wte, "lm_head.weight": hw, "lm_head.bias": hb})
    try:
        config = TransformerDecoderConfig(vocab_size=wte.shape[0], d_model=d, n_layer=len(layers), d_ff=d_ff,
                                          final_norm=final is not None, **options)
    except FormatError as e:
        raise FormatError(f"{src}: {e}") from None
    return config, tensors


def convert_transformer_decoder(src: str, dtype: str, tokenizer=None, config: dict | None = None):
    """-> (config dict, tensors in the file layout, tokenizer JSON)"""
    options = _check_options(config, src)
    cfg, tensors = _parse(read_state_dict(src), options, src)
    tokenizer_json = read_tokenizer(src, tokenizer, cfg.vocab_size)
    # matrices in `dtype`; biases and norms fp32
    return cfg.to_dict(), to_file_layout(tensors, expected_tensors(cfg, dtype), src), tokenizer_json


class ReferenceTransformerDecoder(torch.nn.Module):
    """The seed system as torch.nn runs it as a generator: ids (T, B) -> logits (T, B, V), sequence-first, the
    embedded tokens as target and memory under causal masks."""

    def __init__(self, vocab_size: int, d_model: int, n_head: int, n_layer: int, d_ff: int = 2048,
                 norm_first: bool = False, final_norm: bool = False, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab_size, d_model)
        layer = torch.nn.TransformerDecoderLayer(d_model, n_head, d_ff, dropout=0.0, norm_first=norm_first,
                                                 layer_norm_eps=layer_norm_eps)
        self.decoder = torch.nn.TransformerDecoder(
            layer, n_layer, norm=torch.nn.LayerNorm(d_model, eps=layer_norm_eps) if final_norm else None)
        self.fc = torch.nn.Linear(d_model, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[0])
        return self.fc(self.decoder(x, x, tgt_mask=mask, memory_mask=mask))


def reference_module(src: str, config: dict | None = None) -> ReferenceTransformerDecoder:
    """The checkpoint as the eval-mode torch module (see ReferenceTransformerDecoder): what `aigc-rt validate`
    compares a converted file with. config: the converted file's (n_head, norm_first, layer_norm_eps)."""
    options = {k: v for k, v in (config or {}).items() if k in ("n_head", "norm_first", "layer_norm_eps")}
    cfg, tensors = _parse(read_state_dict(src), _check_options(options, src), src)
    ref = ReferenceTransformerDecoder(cfg.vocab_size, cfg.d_model, cfg.n_head, cfg.n_layer, cfg.d_ff, cfg.norm_first,
                                      cfg.final_norm, cfg.layer_norm_eps)
    state = {"embedding.weight": tensors["wte.weight"], "fc.weight": tensors["lm_head.weight"],
             "fc.bias": tensors["lm_head.bias"]}
    if cfg.final_norm:
        state["decoder.norm.weight"], state["decoder.norm.bias"] = tensors["norm.weight"], tensors["norm.bias"]
    for i in range(cfg.n_layer):
        L, R = f"layers.{i}.", f"decoder.layers.{i}."
        state[R + "self_attn.in_proj_weight"] = tensors[L + "self_attn.qkv.weight"]
        state[R + "self_attn.in_proj_bias"] = tensors[L + "self_attn.qkv.bias"]
        state[R + "multihead_attn.in_proj_weight"] = torch.cat([tensors[L + "cross_attn.q.weight"],
                                                                tensors[L + "cross_attn.kv.weight"]])
        state[R + "multihead_attn.in_proj_bias"] = torch.cat([tensors[L + "cross_attn.q.bias"],
                                                              tensors[L + "cross_attn.kv.bias"]])
        for ours, theirs in (("self_attn.proj", "self_attn.out_proj"), ("cross_attn.proj", "multihead_attn.out_proj"),
                             ("fc1", "linear1"), ("fc2", "linear2"), *((n, n) for n in NORMS)):
            state[R + theirs + ".weight"], state[R + theirs + ".bias"] = tensors[L + ours + ".weight"], \
                tensors[L + ours + ".bias"]
    ref.load_state_dict(state)
    return ref.eval()
