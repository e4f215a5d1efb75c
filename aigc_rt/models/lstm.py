"""The seed LSTM text generator, written once against a backend's op set; read it top to bottom.

    Embedding(V, E) -> LSTM(E, H, L) -> Linear(H, V)        (torch.nn, sequence-first, zero initial state)

Each layer l at step t, with x its input (the embedded token for l = 0, layer l - 1's h otherwise) and torch's
gate order (input, forget, cell, output):
    gates = x W_ih^T + h W_hh^T + b          (b = b_ih + b_hh, summed by the converter)
    c = sigmoid(f) * c + sigmoid(i) * tanh(g);   h = sigmoid(o) * tanh(c)
Two linears per layer (the second adds into the first's output: backend.linear's residual) and one
backend.lstm_cell. Prefill runs W_ih over the whole prompt at once and only the recurrence step by step.
A sequence's state is (h, c) per layer, fixed-size: the LSTM counterpart of GPT-2's KV cache (LSTMState), so
generation (generation.py) drives it the same way, and it has no context limit.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..config import LSTMConfig
from ..format import SCALE_SUFFIX, TensorSpec, add_embedding, add_matrix, owned
from ..tokenizer import Tokenizer
from .text import DecodeCache, StepBuffers, TextModel


def expected_tensors(c: LSTMConfig, dtype: str) -> TensorSpec:
    """Matrices in the file's dtype (int8, int4: with their NAME_scale beside, format.add_matrix; the
    embedding stays int8 in int4 files); biases fp32.
    layers.l.ih.weight (4H, in) = W_ih, layers.l.hh.weight (4H, H) = W_hh, layers.l.bias (4H,) = b_ih + b_hh."""
    f32, H = torch.float32, c.hidden_size
    spec = {}
    matrix = functools.partial(add_matrix, spec, dtype=dtype)  # matrix(name, shape)
    add_embedding(spec, "wte.weight", (c.vocab_size, c.n_embd), dtype)
    for i in range(c.n_layer):
        matrix(f"layers.{i}.ih.weight", (4 * H, c.n_embd if i == 0 else H))
        matrix(f"layers.{i}.hh.weight", (4 * H, H))
        spec[f"layers.{i}.bias"] = ((4 * H,), f32)
    matrix("lm_head.weight", (c.vocab_size, H))
    spec["lm_head.bias"] = ((c.vocab_size,), f32)
    return spec


@dataclass
class Workspace(StepBuffers):
    """The decode step's preallocated fp32 buffers for N rows."""
    x: torch.Tensor  # (N, E) the embedded tokens
    gates: torch.Tensor  # (N, 4H)
    scratch: torch.Tensor  # (N, 4H) where h W_hh^T may go on its way into gates (see backend.linear's residual)
    logits: torch.Tensor  # (N, V)
    lengths: torch.Tensor  # (N,) int64: the generation loop's positions + 1 (unused by the recurrence)

    @classmethod
    def allocate(cls, c: LSTMConfig, n: int, device) -> "Workspace":
        f32 = torch.float32
        return cls(*(torch.empty(n, w, device=device, dtype=f32) for w in (c.n_embd, 4 * c.hidden_size,
                                                                            4 * c.hidden_size, c.vocab_size)),
                   lengths=torch.empty(n, device=device, dtype=torch.int64))


class LSTMState(DecodeCache):
    """Each sequence's (h, c), (n_layer, B, H) fp32 each, zeros until a prefill writes them; beside them, the
    decode step's Workspace. Nothing is sized by max_len: the state is fixed-size."""
    STATE = ("h", "c")

    def __init__(self, c: LSTMConfig, batch: int, max_len: int, device):
        self.h = torch.zeros(c.n_layer, batch, c.hidden_size, device=device)
        self.c = torch.zeros_like(self.h)
        super().__init__(Workspace.allocate(c, batch, device), batch, max_len)


@dataclass
class Layer:
    ih: object  # backend-prepared linears; ih carries the summed bias
    hh: object


class LSTM(TextModel):
    arch = "lstm"

    def __init__(self, config: LSTMConfig, tensors: dict[str, torch.Tensor], backend, tokenizer: Tokenizer,
                 dtype: str = "fp32"):
        super().__init__(config, backend, tokenizer, dtype)
        t = {k: v.to(self.device) for k, v in tensors.items()}

        def linear(name: str, bias: torch.Tensor | None):
            return backend.prepare_linear(t[name], bias, t.get(name + SCALE_SUFFIX))

        self.wte, self.wte_scale = owned(t["wte.weight"]), owned(t.get("wte.weight" + SCALE_SUFFIX))  # (V, E), (V,)
        self.layers = [Layer(ih=linear(f"layers.{i}.ih.weight", t[f"layers.{i}.bias"]),
                             hh=linear(f"layers.{i}.hh.weight", None)) for i in range(config.n_layer)]
        self.lm_head = linear("lm_head.weight", t["lm_head.bias"])

    @property
    def n_params(self) -> int:
        """As torch counts the module's (two bias vectors per layer)."""
        c, H = self.config, self.config.hidden_size
        lstm = sum(4 * H * ((c.n_embd if i == 0 else H) + H + 2) for i in range(c.n_layer))
        return c.vocab_size * c.n_embd + lstm + c.vocab_size * (H + 1)

    def new_cache(self, batch: int, max_len: int) -> LSTMState:
        return LSTMState(self.config, batch, max_len, self.device)

    # -- the recurrence --------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, cache: LSTMState | None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) int64, rows right-padded; lengths (B,) int64 each row's length (None: all T). Returns the
        last layer's h at every position, (B, T, H) (padding positions hold garbage), and leaves each row's
        state after its last real token in cache."""
        B, T = ids.shape
        H, be, dev = self.config.hidden_size, self.backend, ids.device
        x = be.embedding(self.wte, ids.t().reshape(-1), scale=self.wte_scale)  # (T*B, E), time-major
        scratch = torch.empty(B, 4 * H, device=dev)
        for i, layer in enumerate(self.layers):
            gates = be.linear(x, layer.ih).view(T, B, 4 * H)  # the input's part of every step at once
            ys = torch.empty(T, B, H, device=dev)  # h at each step
            cs = torch.empty(T, B, H, device=dev)  # c at each step
            h, c = torch.zeros(B, H, device=dev), torch.zeros(B, H, device=dev)  # torch's default initial state
            for t in range(T):
                be.linear(h, layer.hh, out=scratch, residual=gates[t])  # gates[t] += h W_hh^T
                h, c = be.lstm_cell(gates[t], c, h_out=ys[t], c_out=cs[t])
            if cache is not None:
                last = (torch.full((B,), T, device=dev) if lengths is None else lengths.to(dev)) - 1
                rows = torch.arange(B, device=dev)
                cache.h[i] = ys[last, rows]
                cache.c[i] = cs[last, rows]
            x = ys.view(T * B, H)
        return x.view(T, B, H).transpose(0, 1)

    def _decode_step(self, tokens, positions, lengths, cache: LSTMState, max_len: int) -> torch.Tensor:
        """Backend ops only, on its inputs, the state and the state's Workspace (so that a backend can replay it)."""
        be, ws = self.backend, cache.workspace(tokens.shape[0])
        x = be.embedding(self.wte, tokens, scale=self.wte_scale, out=ws.x)  # (B, E)
        for i, layer in enumerate(self.layers):
            h, c = cache.h[i], cache.c[i]  # (B, H) views, updated in place
            be.linear(x, layer.ih, out=ws.gates)
            be.linear(h, layer.hh, out=ws.scratch, residual=ws.gates)  # gates += h W_hh^T
            x, _ = be.lstm_cell(ws.gates, c, h_out=h, c_out=c)
        return be.linear(x, self.lm_head, out=ws.logits)
