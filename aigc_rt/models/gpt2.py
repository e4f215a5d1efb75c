"""GPT-2, written once against a backend's op set; read it top to bottom.

Residual stream r (fp32). Each block: r += proj(attn(qkv(LN1(r)))); r += mlp(LN2(r)). Each sub-layer's
output linear adds into r itself (backend.linear with a residual), and its input linear takes r with the
LayerNorm before it (backend.layernorm_linear), so that a backend can fuse both (the triton backend does: four
launches per block besides attention); the MLP sub-layer is one backend op (backend.mlp), and so is a decode
step's attention sub-layer (backend.attention_block_decode: LN1, qkv, attention with this step's keys and values
appended, proj, residual add): the triton backend runs each as one kernel for a decode step's few rows (two
launches per block over a short cache). Prefill runs the prompt through and
fills the preallocated KV cache; decode runs one token per sequence at its own position. Every op writes into a
Workspace (buffers for N rows): prefill makes one per call, decode uses the one that lives with the KV
cache, so a decode step allocates no tensors.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..config import GPT2Config
from ..format import DTYPES, SCALE_SUFFIX, TensorSpec, add_embedding, add_matrix, owned
from ..tokenizer import Tokenizer
from .text import DecodeCache, StepBuffers, TextModel

LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def linear_shapes(c: GPT2Config) -> dict[str, tuple[int, int]]:
    """(out, in) of each block linear, in the layout the kernels want."""
    C = c.n_embd
    return {"attn.qkv": (3 * C, C), "attn.proj": (C, C), "mlp.fc": (4 * C, C), "mlp.proj": (C, 4 * C)}


def expected_tensors(c: GPT2Config, dtype: str) -> TensorSpec:
    """Matrices in the file's dtype; biases and LayerNorm parameters in fp32. lm_head is tied to wte.
    int8: each matrix (the block linears and wte, which is also the lm_head) has a (rows,) fp32 scale
    NAME_scale beside it; int4: the block linears are int4 and wte int8 (format.add_embedding); in both wpe stays
    fp32 (it is only indexed, never streamed)."""
    wd, f32, C = DTYPES[dtype], torch.float32, c.n_embd
    spec = {"wpe.weight": ((c.n_positions, C), f32 if dtype in ("int8", "int4") else wd),
            "ln_f.weight": ((C,), f32), "ln_f.bias": ((C,), f32)}
    matrix = functools.partial(add_matrix, spec, dtype=dtype)  # matrix(name, shape)
    add_embedding(spec, "wte.weight", (c.vocab_size, C), dtype)
    for i in range(c.n_layer):
        for ln in ("ln_1", "ln_2"):
            spec[f"h.{i}.{ln}.weight"] = ((C,), f32)
            spec[f"h.{i}.{ln}.bias"] = ((C,), f32)
        for name, shape in linear_shapes(c).items():
            matrix(f"h.{i}.{name}.weight", shape)
            spec[f"h.{i}.{name}.bias"] = ((shape[0],), f32)
    return spec


def kv_cache_dtype(file_dtype: str) -> torch.dtype:
    """The KV cache's default dtype for a weights file's dtype: fp32 for fp32 and fp16 files (exact), bf16 for
    bf16, int8 and int4 files (half the bytes the decode attention reads; rounding no coarser than the weights')."""
    return torch.bfloat16 if file_dtype in ("bf16", "int8", "int4") else torch.float32


@dataclass
class Workspace(StepBuffers):
    """Preallocated fp32 buffers for a forward pass over N rows (tokens); every op writes into one."""
    r: torch.Tensor  # (N, C) residual stream
    h: torch.Tensor  # (N, C) LayerNorm(r), the input of the next sub-layer (scratch where it is fused)
    qkv: torch.Tensor  # (N, 3C)
    attn: torch.Tensor  # (N, C) attention output, heads concatenated
    out: torch.Tensor  # (N, C) output of attn.proj / mlp.proj (scratch: see backend.linear's residual)
    fc: torch.Tensor  # (N, 4C) GELU(mlp.fc(h))
    logits: torch.Tensor  # (N, V); (0, V) where the caller computes logits itself (prefill)
    lengths: torch.Tensor  # (N,) int64: cached positions per sequence, decode

    @classmethod
    def allocate(cls, c: GPT2Config, n: int, device, logits: bool) -> "Workspace":
        C, f32 = c.n_embd, torch.float32
        return cls(*(torch.empty(n, w, device=device, dtype=f32) for w in (C, C, 3 * C, C, C, 4 * C)),
                   logits=torch.empty(n if logits else 0, c.vocab_size, device=device, dtype=f32),
                   lengths=torch.empty(n, device=device, dtype=torch.int64))


class KVCache(DecodeCache):
    """Preallocated keys and values, (n_layer, B, H, S, D) each, fp32 or bf16 (GPT2.kv_dtype). Sequence b's
    position p lives at [:, b, :, p]. Beside them, the decode step's Workspace."""
    STATE = ("k", "v")

    def __init__(self, c: GPT2Config, batch: int, max_len: int, device, dtype=torch.float32):
        shape = (c.n_layer, batch, c.n_head, max_len, c.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        super().__init__(Workspace.allocate(c, batch, device, logits=True), batch, max_len)


@dataclass
class Block:
    ln_1: tuple[torch.Tensor, torch.Tensor]
    qkv: object  # backend-prepared linears
    proj: object
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc: object
    mlp_proj: object


class GPT2(TextModel):
    arch = "gpt2"

    def __init__(self, config: GPT2Config, tensors: dict[str, torch.Tensor], backend, tokenizer: Tokenizer,
                 dtype: str = "fp32"):
        super().__init__(config, backend, tokenizer, dtype)
        self.kv_dtype = kv_cache_dtype(dtype)  # settable before generating
        dev = self.device
        t = {k: v.to(dev) for k, v in tensors.items()}

        def scale(name):  # int8 and int4 files: the matrix's scales
            return t.get(name + SCALE_SUFFIX)

        def norm(name):  # a LayerNorm's (weight, bias)
            return owned(t[name + ".weight"]), owned(t[name + ".bias"])

        self.wte, self.wte_scale = owned(t["wte.weight"]), owned(scale("wte.weight"))  # (V, C), (V,) or None
        self.wpe = owned(t["wpe.weight"].float())  # (P, C)
        self.blocks = []
        for i in range(config.n_layer):
            p = f"h.{i}."
            lin = {n: backend.prepare_linear(t[p + n + ".weight"], t[p + n + ".bias"], scale(p + n + ".weight"))
                   for n in LINEARS}
            self.blocks.append(Block(
                ln_1=norm(p + "ln_1"), qkv=lin["attn.qkv"], proj=lin["attn.proj"],
                ln_2=norm(p + "ln_2"), fc=lin["mlp.fc"], mlp_proj=lin["mlp.proj"]))
        self.ln_f = norm("ln_f")
        self.lm_head = backend.prepare_linear(self.wte, None, self.wte_scale)  # tied to the token embedding

    @property
    def n_params(self) -> int:
        c = self.config
        per_block = sum(o * i + o for o, i in linear_shapes(c).values()) + 4 * c.n_embd
        return c.n_layer * per_block + (c.vocab_size + c.n_positions) * c.n_embd + 2 * c.n_embd

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config, batch, max_len, self.device, self.kv_dtype)

    # -- the transformer -----------------------------------------------------------------------------
    def _blocks(self, ws: Workspace, attend) -> torch.Tensor:
        """ws.r: the embedded tokens (N, C), the residual stream, updated in place. attend(layer, blk) adds the
        block's attention sub-layer into ws.r: r += attn.proj(attention(qkv(LN1(r)))). Returns r after the last
        block (ln_f not applied)."""
        be, eps = self.backend, self.config.layer_norm_epsilon
        for i, blk in enumerate(self.blocks):
            attend(i, blk)
            be.mlp(ws.r, *blk.ln_2, eps, blk.fc, blk.mlp_proj, "gelu_tanh", norm_out=ws.h, hidden_out=ws.fc,
                   out=ws.out)  # r += mlp.proj(GELU(mlp.fc(LN2(r))))
        return ws.r

    def _embed(self, ws: Workspace, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """ws.r = wte[ids] + wpe[positions]; ids, positions (N,) int64."""
        self.backend.embedding(self.wte, ids, scale=self.wte_scale, pos_table=self.wpe, positions=positions, out=ws.r)

    def prefill(self, ids: torch.Tensor, cache: KVCache | None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) int64 (rows right-padded; padding never reaches a real position's result, so the rows'
        lengths are not needed). Fills cache[:, :, :, :T] and returns ln_f(hidden) for every position, (B, T, C)."""
        B, T = ids.shape
        C, H, D, eps = self.config.n_embd, self.config.n_head, self.config.head_dim, self.config.layer_norm_epsilon
        ws = Workspace.allocate(self.config, B * T, ids.device, logits=False)
        self._embed(ws, ids.reshape(-1), torch.arange(T, device=ids.device).repeat(B))

        def attend(layer, blk):  # r += proj(attention(qkv(LN1(r)))), through ws.qkv and ws.attn
            qkv = self.backend.layernorm_linear(ws.r, *blk.ln_1, eps, blk.qkv, norm_out=ws.h, out=ws.qkv)
            q, k, v = (x.view(B, T, H, D).transpose(1, 2) for x in qkv.view(-1, 3, H, D).unbind(1))  # (B, H, T, D)
            if cache is not None:
                cache.k[layer, :, :, :T] = k
                cache.v[layer, :, :, :T] = v
            self.backend.attention_prefill(q, k, v, out=ws.attn.view(B, T, H, D).transpose(1, 2))  # (B, H, T, D)
            self.backend.linear(ws.attn, blk.proj, out=ws.out, residual=ws.r)

        r = self._blocks(ws, attend)
        return self.backend.layernorm(r, *self.ln_f, eps, out=ws.h).view(B, T, C)

    def _decode_step(self, tokens, positions, lengths, cache: KVCache, max_len: int) -> torch.Tensor:
        """All its work is backend ops on its inputs, the cache and the cache's Workspace (so that a backend can
        replay it, see TorchBackend.run_decode)."""
        B, H, D, eps = tokens.shape[0], self.config.n_head, self.config.head_dim, self.config.layer_norm_epsilon
        ws = cache.workspace(B)
        self._embed(ws, tokens, positions)

        def attend(layer, blk):  # r += proj(attention(qkv(LN1(r)))), one kernel where the backend fuses it
            self.backend.attention_block_decode(ws.r, *blk.ln_1, eps, blk.qkv, blk.proj, cache.k[layer],
                                                cache.v[layer], positions, lengths, max_len, norm_out=ws.h,
                                                qkv_out=ws.qkv, attn_out=ws.attn.view(B, H, D), out=ws.out)

        r = self._blocks(ws, attend)
        return self.backend.layernorm_linear(r, *self.ln_f, eps, self.lm_head, norm_out=ws.h, out=ws.logits)
