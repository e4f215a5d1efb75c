"""GPT-2, written once against a backend's op set; read it top to bottom.

Residual stream r (fp32). Each block: h = LN1(r); r += proj(attn(qkv(h))); h = LN2(r); r += mlp(h).
The residual add is fused with the LayerNorm that follows it (backend.add_layernorm), so the loop
carries the normalised input of the next sub-layer. Prefill runs the prompt through and fills the
preallocated KV cache; decode runs one token per sequence at its own position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GPT2Config
from ..format import DTYPES, TensorSpec
from ..tokenizer import Tokenizer

LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def linear_shapes(c: GPT2Config) -> dict[str, tuple[int, int]]:
    """(out, in) of each block linear, in the layout the kernels want."""
    C = c.n_embd
    return {"attn.qkv": (3 * C, C), "attn.proj": (C, C), "mlp.fc": (4 * C, C), "mlp.proj": (C, 4 * C)}


def expected_tensors(c: GPT2Config, dtype: str) -> TensorSpec:
    """Matrices in the file's dtype; biases and LayerNorm parameters in fp32. lm_head is tied to wte."""
    wd, f32, C = DTYPES[dtype], torch.float32, c.n_embd
    spec = {"wte.weight": ((c.vocab_size, C), wd), "wpe.weight": ((c.n_positions, C), wd),
            "ln_f.weight": ((C,), f32), "ln_f.bias": ((C,), f32)}
    for i in range(c.n_layer):
        for ln in ("ln_1", "ln_2"):
            spec[f"h.{i}.{ln}.weight"] = ((C,), f32)
            spec[f"h.{i}.{ln}.bias"] = ((C,), f32)
        for name, shape in linear_shapes(c).items():
            spec[f"h.{i}.{name}.weight"] = (shape, wd)
            spec[f"h.{i}.{name}.bias"] = ((shape[0],), f32)
    return spec


class KVCache:
    """Preallocated keys and values, (n_layer, B, H, S, D) each. Sequence b's position p lives at [:, b, :, p]."""

    def __init__(self, c: GPT2Config, batch: int, max_len: int, device, dtype=torch.float32):
        shape = (c.n_layer, batch, c.n_head, max_len, c.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished sequences: keep only batch rows `rows` (in that order)."""
        self.k = self.k[:, rows].contiguous()
        self.v = self.v[:, rows].contiguous()


@dataclass
class Block:
    ln_1: tuple[torch.Tensor, torch.Tensor]
    qkv: object  # backend-prepared linears
    proj: object
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc: object
    mlp_proj: object


class GPT2:
    arch = "gpt2"

    def __init__(self, config: GPT2Config, tensors: dict[str, torch.Tensor], backend, tokenizer: Tokenizer,
                 dtype: str = "fp32"):
        self.config, self.backend, self.tokenizer, self.dtype = config, backend, tokenizer, dtype
        self.device = backend.device
        dev = self.device
        t = {k: v.to(dev) for k, v in tensors.items()}
        self.wte, self.wpe = t["wte.weight"], t["wpe.weight"]  # (V, C), (P, C)
        self.blocks = []
        for i in range(config.n_layer):
            p = f"h.{i}."
            lin = {n: backend.prepare_linear(t[p + n + ".weight"], t[p + n + ".bias"]) for n in LINEARS}
            self.blocks.append(Block(
                ln_1=(t[p + "ln_1.weight"], t[p + "ln_1.bias"]), qkv=lin["attn.qkv"], proj=lin["attn.proj"],
                ln_2=(t[p + "ln_2.weight"], t[p + "ln_2.bias"]), fc=lin["mlp.fc"], mlp_proj=lin["mlp.proj"]))
        self.ln_f = (t["ln_f.weight"], t["ln_f.bias"])
        self.lm_head = backend.prepare_linear(self.wte, None)  # tied to the token embedding

    @property
    def n_params(self) -> int:
        c = self.config
        per_block = sum(o * i + o for o, i in linear_shapes(c).values()) + 4 * c.n_embd
        return c.n_layer * per_block + (c.vocab_size + c.n_positions) * c.n_embd + 2 * c.n_embd

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.device)

    # -- the transformer -----------------------------------------------------------------------------
    def _blocks(self, r: torch.Tensor, attend) -> torch.Tensor:
        """r: residual stream (N, C) fp32, updated in place. attend(layer, q, k, v) with q, k, v
        (N, H, D) -> (N, C). Returns ln_f(r)."""
        be, eps, H, D = self.backend, self.config.layer_norm_epsilon, self.config.n_head, self.config.head_dim
        h = be.layernorm(r, *self.blocks[0].ln_1, eps)
        for i, blk in enumerate(self.blocks):
            qkv = be.linear(h, blk.qkv)  # (N, 3C)
            q, k, v = qkv.view(-1, 3, H, D).unbind(1)  # (N, H, D) each
            a = be.linear(attend(i, q, k, v), blk.proj)  # (N, C)
            h = be.add_layernorm(a, r, *blk.ln_2, eps)
            m = be.linear(be.linear(h, blk.fc, act="gelu_tanh"), blk.mlp_proj)
            nxt = self.blocks[i + 1].ln_1 if i + 1 < len(self.blocks) else self.ln_f
            h = be.add_layernorm(m, r, *nxt, eps)
        return h

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.wte[ids].float() + self.wpe[positions].float()

    def prefill(self, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """ids (B, T) int64 (rows right-padded; padding never reaches a real position's result).
        Fills cache[:, :, :, :T] and returns ln_f(hidden) for every position, (B, T, C)."""
        B, T = ids.shape
        C, H, D = self.config.n_embd, self.config.n_head, self.config.head_dim
        r = self._embed(ids, torch.arange(T, device=ids.device)).view(B * T, C)

        def attend(layer, q, k, v):  # (B*T, H, D) -> (B*T, C)
            q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
            if cache is not None:
                cache.k[layer, :, :, :T] = k
                cache.v[layer, :, :, :T] = v
            o = self.backend.attention_prefill(q.contiguous(), k.contiguous(), v.contiguous())
            return o.transpose(1, 2).reshape(B * T, C)

        return self._blocks(r, attend).view(B, T, C)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, max_len: int) -> torch.Tensor:
        """One new token per sequence. tokens, positions (B,) int64 on the device; max_len (host int)
        >= max(positions) + 1. Writes the token's k, v at its position and returns logits (B, V) fp32.
        The backend runs the step (the triton backend replays it from a CUDA graph)."""
        return self.backend.run_decode(self._decode_step, tokens, positions, cache, max_len)

    def _decode_step(self, tokens, positions, cache: KVCache, max_len: int) -> torch.Tensor:
        B = tokens.shape[0]
        rows = torch.arange(B, device=tokens.device)
        lengths = positions + 1
        r = self._embed(tokens, positions)  # (B, C)

        def attend(layer, q, k, v):  # (B, H, D) -> (B, C)
            cache.k[layer, rows, :, positions] = k
            cache.v[layer, rows, :, positions] = v
            return self.backend.attention_decode(q, cache.k[layer], cache.v[layer], lengths, max_len).reshape(B, -1)

        return self.backend.linear(self._blocks(r, attend), self.lm_head)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, C) -> logits (N, V) fp32."""
        return self.backend.linear(hidden, self.lm_head)

    # -- public --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Full forward for validation: LongTensor (B, T) -> float32 (B, T, V)."""
        ids = self.check_ids(torch.as_tensor(input_ids))
        B, T = ids.shape
        return self.head(self.prefill(ids.to(self.device), None).view(B * T, -1)).view(B, T, -1)

    def check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.config
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor (B, T), got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] == 0 or ids.shape[0] == 0:
            raise ValueError("input_ids is empty")
        if ids.shape[1] > c.n_positions:
            raise ValueError(f"input of {ids.shape[1]} tokens exceeds the context length {c.n_positions}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {c.vocab_size})")
        return ids.long()

    def generate(self, prompts, **kwargs):
        from ..generation import generate
        return generate(self, prompts, **kwargs)

    def stream(self, prompt, **kwargs):
        from ..generation import stream
        return stream(self, prompt, **kwargs)
