"""The `cpu` backend: C++ kernels from csrc/cpu (aigc_rt._C) where we have them, the torch reference for
the rest of the op set.

The decode step is replayed rather than re-run from Python (the CPU counterpart of the triton backend's CUDA
graphs): the first step on a KV cache runs eagerly on static input buffers while every op also records itself
into a C++ StepProgram (csrc/cpu/step_program.cpp), with the tensors it read and wrote; later steps copy their
inputs into those buffers and replay the program with one call (no Python between the ~100 ops of a GPT-2 124M
step, and without the GIL). While recording, any torch call but a view raises: it would run once and never again.
A program lives with its cache (so it never keeps a finished generation's cache alive) and is recorded again when
the batch or the cache's buffers change (a finished sequence leaving the batch). AIGC_RT_CPU_REPLAY=0 runs every
step eagerly.
"""
from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode, resolve_name

from .. import _C
from .torch_backend import TorchBackend, check_activation


ACT_CODES = {None: 0, "gelu_tanh": 1, "relu": 2}  # _C.linear's act (csrc/cpu/ops.h kActNone, ...)


@dataclass
class _Replay:
    key: tuple  # (step, batch, the cache's and its Workspace's addresses)
    tokens: torch.Tensor  # static inputs, (B,) int64
    positions: torch.Tensor
    lengths: torch.Tensor
    program: _C.StepProgram
    logits: torch.Tensor  # the step's output, rewritten by every replay


# What a recorded step may call on tensors besides backend ops: views and queries (property reads too); they
# compute nothing, so not replaying them changes nothing. (contiguous() is a no-op here: the backend refuses
# a non-contiguous input while recording.)
_VIEWS_AND_QUERIES = frozenset({
    "view", "unbind", "__getitem__", "transpose", "select", "narrow", "unsqueeze", "squeeze", "permute", "t",
    "split", "chunk", "expand", "contiguous", "is_contiguous", "dim", "size", "stride", "numel", "data_ptr",
    "element_size", "storage_offset", "__len__"})


class _OnlyViews(TorchFunctionMode):
    """Refuses every torch call but a view or a query while a decode step is recorded (it would not be
    replayed). A TorchFunctionMode sees the step's own Python-level calls (not the backend's C++ ops), and costs
    nothing to enter, where a TorchDispatchMode's first use imports torch._dynamo (~1.5 s)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = resolve_name(func) or repr(func)
        if not (name.endswith(".__get__") or name.rpartition(".")[2] in _VIEWS_AND_QUERIES):
            raise RuntimeError(f"the cpu backend is recording a decode step, which must do all its work in backend "
                               f"ops, but it called {name}: that would not be replayed")
        return func(*args, **(kwargs or {}))


class CpuBackend(TorchBackend):
    name = "cpu"

    def __init__(self, device: torch.device):
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs on the CPU, not on {device}")
        super().__init__(device)
        self.replay = os.environ.get("AIGC_RT_CPU_REPLAY") != "0"
        self._replays: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KV cache -> its _Replay
        self._thread = threading.local()  # .program: what this thread's running step records into (threads
        # sharing a model each decode on their own cache; another thread's ops must not land in this program)

    @property
    def _recording(self) -> _C.StepProgram | None:
        return getattr(self._thread, "program", None)

    def run_decode(self, step, tokens, positions, lengths, cache, max_len):
        if not self.replay:
            return step(tokens, positions, lengths, cache, max_len)
        B = tokens.shape[0]
        key = (step, B, cache.addresses(B))
        r = self._replays.get(cache)
        if r is not None and r.key == key:
            r.tokens.copy_(tokens)
            r.positions.copy_(positions)
            r.lengths.copy_(lengths)
            r.program.run(max_len)
            return r.logits
        inputs = [t.clone() for t in (tokens, positions, lengths)]
        program = self._thread.program = _C.StepProgram()
        try:
            with _OnlyViews():
                logits = step(*inputs, cache, max_len)
        finally:
            self._thread.program = None
        self._replays[cache] = _Replay(key, *inputs, program, logits)
        return logits

    def _contiguous(self, x: torch.Tensor) -> torch.Tensor:
        if self._recording is not None and not x.is_contiguous():  # the copy would be a snapshot
            raise RuntimeError(f"the cpu backend is recording a decode step: an op input of shape {tuple(x.shape)} "
                               f"and strides {x.stride()} is not contiguous")
        return x.contiguous()

    def prepare_linear(self, weight, bias, scale=None) -> _C.PackedLinear:
        """The weight repacked once into the panel layout csrc/cpu/linear.cpp streams."""
        lin = super().prepare_linear(weight, bias, scale)  # checks; fp32 bias and scale
        return _C.PackedLinear(lin.weight.contiguous(), lin.bias, lin.scale)

    # each op used by a decode step also records itself (into its own output) while a step is recorded
    def linear(self, x, lin: _C.PackedLinear, act=None, *, out=None, residual=None):
        check_activation(act)
        x = self._contiguous(x)
        y = _C.linear(x, lin, ACT_CODES[act], out, residual)  # residual += y in the epilogue
        if self._recording is not None:
            self._recording.linear(x, lin, ACT_CODES[act], y, residual)
        return y if residual is None else residual

    def embedding(self, table, ids, *, scale=None, pos_table=None, positions=None, out=None):
        ids = self._contiguous(ids)
        y = _C.embedding(table, ids, scale, out, pos_table, positions)
        if self._recording is not None:
            self._recording.embedding(table, ids, scale, y, pos_table, positions)
        return y

    def layernorm(self, x, w, b, eps, *, out=None):
        x = self._contiguous(x)
        y = _C.layernorm(x, w, b, eps, out)
        if self._recording is not None:
            self._recording.layernorm(x, w, b, eps, y)
        return y

    def attention_prefill(self, q, k, v, *, out=None):
        # any strides with a contiguous last dim; a new output is laid out (B, T, H, D) in memory
        return _C.attention_prefill(q, k, v, out=out)

    def write_kv(self, k_cache, v_cache, positions, k, v):
        _C.write_kv(k_cache, v_cache, positions, k, v)
        if self._recording is not None:
            self._recording.write_kv(k_cache, v_cache, positions, k, v)

    def attention_decode(self, q, k_cache, v_cache, lengths, max_len, *, out=None):
        y = _C.attention_decode(q, k_cache, v_cache, lengths, max_len, out=out)
        if self._recording is not None:
            self._recording.attention_decode(q, k_cache, v_cache, lengths, y)
        return y

    def lstm_cell(self, gates, c, *, h_out=None, c_out=None):
        gates, c = self._contiguous(gates), self._contiguous(c)
        h_out = torch.empty_like(c) if h_out is None else h_out
        c_out = torch.empty_like(c) if c_out is None else c_out
        _C.lstm_cell(gates, c, h_out, c_out)
        if self._recording is not None:
            self._recording.lstm_cell(gates, c, h_out, c_out)
        return h_out, c_out

    def reparameterize(self, head, eps):
        return _C.vae_reparameterize(head.contiguous(), eps.contiguous())

    def bernoulli_elbo(self, logits, x, head):
        return _C.vae_bernoulli_elbo(logits.contiguous(), x.contiguous(), head.contiguous())

    def bernoulli_log_likelihood(self, logits, x):
        return _C.vae_bernoulli_log_likelihood(logits.contiguous(), x.contiguous())

    def sample(self, logits, params, u, seen, *, out=None):
        return _C.sample(logits, params.do_sample, params.temperature, params.top_k, params.top_p,
                         params.repetition_penalty, u, seen, out=out)

    # DCGAN: the generator's transposed convs and the discriminator's convs on csrc/cpu/conv.cpp (activations stay
    # channels_last between layers)
    # (bf16 weights stay bf16: the C++ ops then round each input to bf16 and multiply on bf16 tiles; out_bf16 layers
    # store their outputs rounded, as bf16, which the next layer would have rounded on the way in)
    def prepare_conv_transpose(self, weight, bias, stride, padding, output_padding):
        return _C.conv_transpose_prepare(_conv_weight(weight), bias.to(torch.float32, copy=True), stride, padding,
                                         output_padding)

    def conv_transpose(self, x, layer, act, out_bf16=False):
        return _C.conv_transpose(x, layer, act, out_bf16=out_bf16)

    def prepare_conv2d(self, weight, bias, stride, padding):
        return _C.conv2d_prepare(_conv_weight(weight), bias.to(torch.float32, copy=True), stride, padding)

    def conv2d(self, x, layer, act, leaky_slope=0.2, out_bf16=False):
        return _C.conv2d(x, layer, act, leaky_slope, out_bf16)


def _conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """A convolution's weight as the C++ ops take it: bf16 kept as bf16, anything else as fp32."""
    return weight.contiguous() if weight.dtype == torch.bfloat16 else weight.float().contiguous()
