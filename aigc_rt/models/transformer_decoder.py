"""The seed Transformer decoder text model, written once against a backend's op set; read it top to bottom.

    Embedding(V, d) -> nn.TransformerDecoder(nn.TransformerDecoderLayer(d, n_head, d_ff), L) -> Linear(d, V)

used as a generator: the embedded tokens e are both the decoder's target and its memory, and both attentions are
causal (tgt_mask = memory_mask = the square subsequent mask), so token t sees tokens <= t only and a sequence can
grow one token at a time. That is the module called as

    x = embedding(ids); mask = nn.Transformer.generate_square_subsequent_mask(T)
    logits = fc(decoder(x, x, tgt_mask=mask, memory_mask=mask))

(convert/transformer_decoder.py ReferenceTransformerDecoder, which the tests and `aigc-rt validate` compare with).
Each layer, post-norm (torch's default; norm_first: x + f(LN(x)) instead):
    x = LN1(x + SelfAttn(x));   x = LN2(x + CrossAttn(q = x, k = v = e));   x = LN3(x + W2 relu(W1 x))
The cross-attention's keys and values come from e, which never changes: like the self-attention's, they are
computed once per position and cached, so a decode step costs one token's work (DecoderCache: two KV caches).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..config import TransformerDecoderConfig
from ..format import SCALE_SUFFIX, TensorSpec, add_embedding, add_matrix, owned
from ..tokenizer import Tokenizer
from .gpt2 import kv_cache_dtype
from .text import DecodeCache, StepBuffers, TextModel


def linear_shapes(c: TransformerDecoderConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each layer's linears, in the layout the kernels want."""
    d = c.d_model
    return {"self_attn.qkv": (3 * d, d), "self_attn.proj": (d, d), "cross_attn.q": (d, d),
            "cross_attn.kv": (2 * d, d), "cross_attn.proj": (d, d), "fc1": (c.d_ff, d), "fc2": (d, c.d_ff)}


NORMS = ("norm1", "norm2", "norm3")


def expected_tensors(c: TransformerDecoderConfig, dtype: str) -> TensorSpec:
    """Matrices in the file's dtype (int8, int4: with their NAME_scale beside, format.add_matrix; the
    embedding stays int8 in int4 files); biases, norms fp32."""
    f32, d = torch.float32, c.d_model
    spec = {}
    matrix = functools.partial(add_matrix, spec, dtype=dtype)  # matrix(name, shape)
    add_embedding(spec, "wte.weight", (c.vocab_size, d), dtype)
    for i in range(c.n_layer):
        for name, shape in linear_shapes(c).items():
            matrix(f"layers.{i}.{name}.weight", shape)
            spec[f"layers.{i}.{name}.bias"] = ((shape[0],), f32)
        for norm in NORMS:
            spec[f"layers.{i}.{norm}.weight"] = ((d,), f32)
            spec[f"layers.{i}.{norm}.bias"] = ((d,), f32)
    if c.final_norm:
        spec["norm.weight"], spec["norm.bias"] = ((d,), f32), ((d,), f32)
    matrix("lm_head.weight", (c.vocab_size, d))
    spec["lm_head.bias"] = ((c.vocab_size,), f32)
    return spec


@dataclass
class Workspace(StepBuffers):
    """Preallocated fp32 buffers for a forward pass over N rows (tokens); every op writes into one."""
    e: torch.Tensor  # (N, d) the embedded tokens: the memory
    x: torch.Tensor  # (N, d) the stream (post-norm: alternates with h, one LayerNorm writing the other)
    h: torch.Tensor  # (N, d)
    qkv: torch.Tensor  # (N, 3d) self-attention q, k, v
    q: torch.Tensor  # (N, d) cross-attention queries
    kv: torch.Tensor  # (N, 2d) cross-attention keys and values (of e)
    attn: torch.Tensor  # (N, d) an attention's output, heads concatenated
    out: torch.Tensor  # (N, d) scratch of the linears that add into the stream (see backend.linear's residual)
    ff: torch.Tensor  # (N, d_ff) relu(fc1(x))
    logits: torch.Tensor  # (N, V); (0, V) where the caller computes logits itself (prefill)
    lengths: torch.Tensor  # (N,) int64: cached positions per sequence, decode

    @classmethod
    def allocate(cls, c: TransformerDecoderConfig, n: int, device, logits: bool) -> "Workspace":
        d, f32 = c.d_model, torch.float32
        return cls(*(torch.empty(n, w, device=device, dtype=f32) for w in (d, d, d, 3 * d, d, 2 * d, d, d, c.d_ff)),
                   logits=torch.empty(n if logits else 0, c.vocab_size, device=device, dtype=f32),
                   lengths=torch.empty(n, device=device, dtype=torch.int64))


class DecoderCache(DecodeCache):
    """The self-attention's and the cross-attention's keys and values, (n_layer, B, H, S, D) each (GPT-2's KVCache
    twice), and the decode step's Workspace."""
    STATE = ("self_k", "self_v", "cross_k", "cross_v")

    def __init__(self, c: TransformerDecoderConfig, batch: int, max_len: int, device, dtype=torch.float32):
        shape = (c.n_layer, batch, c.n_head, max_len, c.head_dim)
        for name in self.STATE:
            setattr(self, name, torch.empty(shape, device=device, dtype=dtype))
        super().__init__(Workspace.allocate(c, batch, device, logits=True), batch, max_len)

    def layer(self, i: int, cross: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of layer i's self- or cross-attention, (B, H, S, D) each."""
        return (self.cross_k[i], self.cross_v[i]) if cross else (self.self_k[i], self.self_v[i])


@dataclass
class Layer:
    qkv: object  # backend-prepared linears
    proj: object
    cross_q: object
    cross_kv: object
    cross_proj: object
    fc1: object
    fc2: object
    norms: tuple  # ((weight, bias) of norm1, norm2, norm3)


class TransformerDecoder(TextModel):
    arch = "transformer_decoder"

    def __init__(self, config: TransformerDecoderConfig, tensors: dict[str, torch.Tensor], backend,
                 tokenizer: Tokenizer, dtype: str = "fp32"):
        super().__init__(config, backend, tokenizer, dtype)
        self.kv_dtype = kv_cache_dtype(dtype)  # settable before generating
        t = {k: v.to(self.device) for k, v in tensors.items()}

        def linear(name: str):
            return backend.prepare_linear(t[name + ".weight"], t[name + ".bias"], t.get(name + ".weight" + SCALE_SUFFIX))

        def norm(name: str):  # a LayerNorm's (weight, bias)
            return owned(t[name + ".weight"]), owned(t[name + ".bias"])

        self.wte, self.wte_scale = owned(t["wte.weight"]), owned(t.get("wte.weight" + SCALE_SUFFIX))
        self.layers = []
        for i in range(config.n_layer):
            lin = {name: linear(f"layers.{i}.{name}") for name in linear_shapes(config)}
            self.layers.append(Layer(lin["self_attn.qkv"], lin["self_attn.proj"], lin["cross_attn.q"],
                                     lin["cross_attn.kv"], lin["cross_attn.proj"], lin["fc1"], lin["fc2"],
                                     tuple(norm(f"layers.{i}.{n}") for n in NORMS)))
        self.norm = norm("norm") if config.final_norm else None
        self.lm_head = linear("lm_head")

    @property
    def n_params(self) -> int:
        c = self.config
        per_layer = sum(o * i + o for o, i in linear_shapes(c).values()) + 2 * len(NORMS) * c.d_model
        return c.n_layer * per_layer + c.vocab_size * (2 * c.d_model + 1) + (2 * c.d_model if c.final_norm else 0)

    def new_cache(self, batch: int, max_len: int) -> DecoderCache:
        return DecoderCache(self.config, batch, max_len, self.device, self.kv_dtype)

    # -- the decoder -----------------------------------------------------------------------------------
    def _layers(self, ws: Workspace, attend) -> torch.Tensor:
        """ws.e: the embedded tokens (N, d), also ws.x, the stream's start. attend(layer, cross, q, k, v, out)
        with q, k, v (N, H, D) writes the attention output (N, d) into out and returns it. Returns the stream
        after the last layer (and the final norm, if any)."""
        be, c = self.backend, self.config
        eps, H, D = c.layer_norm_eps, c.n_head, c.head_dim
        x, h = ws.x, ws.h
        for i, layer in enumerate(self.layers):
            (n1w, n1b), (n2w, n2b), (n3w, n3b) = layer.norms
            k, v = be.linear(ws.e, layer.cross_kv, out=ws.kv).view(-1, 2, H, D).unbind(1)  # of the memory
            if c.norm_first:  # x += f(LN(x)), the LayerNorm in the linear's prologue where the backend fuses it
                qkv = be.layernorm_linear(x, n1w, n1b, eps, layer.qkv, norm_out=h, out=ws.qkv).view(-1, 3, H, D)
                be.linear(attend(i, False, *qkv.unbind(1), ws.attn), layer.proj, out=ws.out, residual=x)
                q = be.layernorm_linear(x, n2w, n2b, eps, layer.cross_q, norm_out=h, out=ws.q).view(-1, H, D)
                be.linear(attend(i, True, q, k, v, ws.attn), layer.cross_proj, out=ws.out, residual=x)
                be.mlp(x, n3w, n3b, eps, layer.fc1, layer.fc2, "relu", norm_out=h, hidden_out=ws.ff, out=ws.out)
            else:  # x = LN(x + f(x)), each LayerNorm writing the other buffer
                qkv = be.linear(x, layer.qkv, out=ws.qkv).view(-1, 3, H, D)
                be.linear(attend(i, False, *qkv.unbind(1), ws.attn), layer.proj, out=ws.out, residual=x)
                x, h = be.layernorm(x, n1w, n1b, eps, out=h), x
                q = be.linear(x, layer.cross_q, out=ws.q).view(-1, H, D)
                be.linear(attend(i, True, q, k, v, ws.attn), layer.cross_proj, out=ws.out, residual=x)
                x, h = be.layernorm(x, n2w, n2b, eps, out=h), x
                f = be.linear(x, layer.fc1, "relu", out=ws.ff)
                be.linear(f, layer.fc2, out=ws.out, residual=x)
                x, h = be.layernorm(x, n3w, n3b, eps, out=h), x
        if self.norm is not None:
            x = be.layernorm(x, *self.norm, eps, out=h)
        return x

    def _embed(self, ws: Workspace, ids: torch.Tensor) -> None:
        """ws.e = ws.x = wte[ids]; ids (N,) int64 (embedded twice: the stream is updated in place, the memory
        is not, and a copy would not be a backend op)."""
        for buf in (ws.e, ws.x):
            self.backend.embedding(self.wte, ids, scale=self.wte_scale, out=buf)

    def prefill(self, ids: torch.Tensor, cache: DecoderCache | None, lengths: torch.Tensor | None = None):
        """ids (B, T) int64 (rows right-padded; causal attention keeps padding out of every real position, so the
        lengths are not needed). Fills the caches' first T positions and returns the decoder's output at every
        position, (B, T, d)."""
        B, T = ids.shape
        c = self.config
        H, D = c.n_head, c.head_dim
        ws = Workspace.allocate(c, B * T, ids.device, logits=False)
        self._embed(ws, ids.reshape(-1))

        def attend(layer, cross, q, k, v, out):  # (B*T, H, D) -> out (B*T, d)
            q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
            if cache is not None:
                kc, vc = cache.layer(layer, cross)
                kc[:, :, :T] = k
                vc[:, :, :T] = v
            self.backend.attention_prefill(q, k, v, out=out.view(B, T, H, D).transpose(1, 2))
            return out

        return self._layers(ws, attend).view(B, T, c.d_model)

    def _decode_step(self, tokens, positions, lengths, cache: DecoderCache, max_len: int) -> torch.Tensor:
        """Backend ops only, on its inputs, the caches and the cache's Workspace (so that a backend can replay it)."""
        B, H, D = tokens.shape[0], self.config.n_head, self.config.head_dim
        ws = cache.workspace(B)
        self._embed(ws, tokens)

        def attend(layer, cross, q, k, v, out):  # (B, H, D) -> out (B, d)
            kc, vc = cache.layer(layer, cross)
            self.backend.append_attention_decode(q, k, v, kc, vc, positions, lengths, max_len, out=out.view(B, H, D))
            return out

        return self.backend.linear(self._layers(ws, attend), self.lm_head, out=ws.logits)
