"""The `torch` backend: plain PyTorch on any device. It is the reference every other backend is tested
against, so it favours clarity over speed (fp32 math; low-precision weights are upcast per call)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..sampling import SamplingParams, sample_reference


@dataclass
class Linear:
    weight: torch.Tensor  # (out, in), as stored in the file
    bias: torch.Tensor | None  # (out,) fp32


class TorchBackend:
    name = "torch"

    def __init__(self, device: torch.device):
        self.device = device

    # -- weights -------------------------------------------------------------------------------------
    def prepare_linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        return Linear(weight.to(self.device), None if bias is None else bias.to(self.device, torch.float32))

    # -- ops -----------------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, lin: Linear, act: str | None = None) -> torch.Tensor:
        """x (..., in) fp32 -> (..., out) fp32; act None or "gelu_tanh"."""
        w = lin.weight
        y = F.linear(x.to(w.dtype), w).float()
        if lin.bias is not None:
            y = y + lin.bias
        return F.gelu(y, approximate="tanh") if act == "gelu_tanh" else y

    def layernorm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)

    def add_layernorm(self, x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                      eps: float) -> torch.Tensor:
        """residual += x (in place); returns layernorm(residual)."""
        residual.add_(x)
        return F.layer_norm(residual, (x.shape[-1],), w, b, eps)

    def attention_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                          out: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention. q, k, v (B, H, T, D) -> (B, H, T, D); scale 1/sqrt(D)."""
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o if out is None else out.copy_(o)

    def attention_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         lengths: torch.Tensor, max_len: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """One query per sequence. q (B, H, D); caches (B, H, S, D); row b attends to its first
        lengths[b] cached positions; max_len >= max(lengths) (a host int). -> (B, H, D)."""
        valid = (torch.arange(max_len, device=q.device) < lengths[:, None])[:, None, :, None]  # (B, 1, S, 1)
        # cache slots past a row's length hold anything (even NaN): zero them rather than trust 0 * x == 0
        k = torch.where(valid, k_cache[:, :, :max_len], 0.0)
        v = torch.where(valid, v_cache[:, :, :max_len], 0.0)
        scores = torch.einsum("bhd,bhsd->bhs", q, k) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~valid[..., 0], -math.inf)
        o = torch.einsum("bhs,bhsd->bhd", scores.softmax(dim=-1), v)
        return o if out is None else out.copy_(o)

    def run_decode(self, step, tokens: torch.Tensor, positions: torch.Tensor, cache, max_len: int) -> torch.Tensor:
        """Run a model's decode step, step(tokens, positions, cache, max_len) -> logits; a backend may
        replay it from a CUDA graph instead."""
        return step(tokens, positions, cache, max_len)

    def sample(self, logits: torch.Tensor, params: SamplingParams, u: torch.Tensor,
               seen: torch.Tensor | None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B, V) fp32 -> token ids (B,) int64; -1 marks a row with NaN/inf logits."""
        tokens = sample_reference(logits, params, u, seen)
        return tokens if out is None else out.copy_(tokens)
