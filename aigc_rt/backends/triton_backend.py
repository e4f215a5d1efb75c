"""The `triton` backend: the Triton kernels of aigc_rt.kernels (kernels/) on a CUDA GPU, with the decode step
replayed from a CUDA graph (decode_graph.py). On a CPU it runs only under TRITON_INTERPRET=1 (set before the
kernels are imported), slowly, so that CI validates the kernels and whole models without a GPU. Every op runs
on a kernel; from TorchBackend it takes only what composes ops (layernorm_linear past the prologue's rows,
decode_sample_steps). The DCGAN generator's transposed convolutions are kernels/conv_transpose.py, the
discriminator's convolutions kernels/conv2d.py (bias and activation fused in both); the seed LSTM's cell is
kernels/lstm.py; the Transformer decoder uses the GPT-2 kernels (ReLU in the linear's epilogue); a VAE's
reparameterisation and ELBO sums are kernels/vae.py.
A pre-norm block takes four launches besides attention: the residual adds run in the epilogues of the linears
that produce them, and for a decode step's few rows each LayerNorm in the prologue of the linear after it; for
those rows the MLP sub-layer (LayerNorm, fc, activation, proj, residual add) is one launch, and so is the
attention sub-layer (the qkv linear with its LayerNorm, the attention over a short cache, the output projection,
the residual add) or, over a longer cache, the attention with its projection, where that is the faster
(kernels/mlp.py, kernels/decode_attention.py; FUSED_MLP, FUSED_QKV, FUSED_ATTN_PROJ below).
int4 files keep their matrices int4: decode runs kernels/linear.py's int4 GEMV (INT4_GEMV below)."""
from __future__ import annotations

import dataclasses
import os
import warnings

import torch

from ..kernels import (attention, conv2d, conv_transpose, decode_attention, embedding, layernorm, linear, lstm, mlp,
                       sampling, vae)
from ..kernels.utils import BLOCK_SHAPES, INTERPRETER, new_counters
from .decode_graph import DecodeGraph
from .torch_backend import Conv, Linear, TorchBackend

# Rows up to which a LayerNorm runs in the prologue of the linear after it (every program normalises its rows
# again: free beside the weights it streams for a decode step's few rows; a prefill normalises once, apart)
NORM_IN_PROLOGUE_MAX_ROWS = 16
# generate()'s prefill replays from a CUDA graph for prompts of up to PREFILL_GRAPH_MAX_T tokens, padded to a
# multiple of PREFILL_ROWS (right padding: never read by a real position), one graph per batch size, padded length
# and cache; longer prompts run eagerly (their kernels, not their ~60 launches from Python, take the time)
PREFILL_GRAPH_MAX_T, PREFILL_ROWS = 128, 16
# int4 files: their matrices stay int4 (4.5 bits a weight) and decode runs the int4 GEMV (kernels/linear.py
# linear_int4), a prefill a bf16 copy of each matrix made for the call; AIGC_RT_INT4_GEMV=0 dequantises them to bf16
# once at load instead (3.6x the memory; the only way before 2026-11-30, and the one a GPU has measured)
INT4_GEMV = os.environ.get("AIGC_RT_INT4_GEMV", "1") != "0"
# Sub-layers of up to FUSED_MAX_ROWS rows (decode) run as one kernel where their weights are fp32 / bf16 / fp16 /
# int8: a pre-norm MLP (kernels/mlp.py), the decode attention with its output projection
# (kernels/decode_attention.py, proj=), and over a cache short enough for one pass the whole attention sub-layer,
# the qkv linear too (decode_attention.attention_block); on a GPU only where that is the faster for the shape
# (timed once against the kernels apart, as linear._faster picks GEMV or GEMM). AIGC_RT_FUSED_MLP=0 /
# AIGC_RT_FUSED_ATTN_PROJ=0 / AIGC_RT_FUSED_QKV=0 keep them apart everywhere.
FUSED_MLP = os.environ.get("AIGC_RT_FUSED_MLP", "1") != "0"
FUSED_ATTN_PROJ = os.environ.get("AIGC_RT_FUSED_ATTN_PROJ", "1") != "0"
FUSED_QKV = os.environ.get("AIGC_RT_FUSED_QKV", "1") != "0"
FUSED_MAX_ROWS = 8
# The fused sub-layers add their programs' partial sums through counters in global memory (kernels/utils.py
# gather_partials): their memory ordering is the one thing the interpreter, which runs programs one at a time, cannot
# test. So on a GPU the first launch of each fused shape also runs it composed and each fused launch shape (the
# attention sub-layer has three: utils.BLOCK_SHAPES) twice, from the same input, and keeps a launch shape only if its
# result agrees with the composed one (max |difference| within FUSED_CHECK_RTOL of the sub-layer's largest output)
# and is the same bits when run again; one that does not is dropped for that shape with a warning, and with none
# left the shape runs composed (_fused_agrees). CHECK_FUSED_ON_CPU: tests run the check in the interpreter.
FUSED_CHECK_RTOL = 1e-2
CHECK_FUSED_ON_CPU = False
_checked: dict[tuple, tuple[str, ...]] = {}  # fused sub-layer key -> its launch shapes that passed the check


class TritonBackend(TorchBackend):
    name = "triton"

    def __init__(self, device: torch.device):
        if INTERPRETER and device.type != "cpu":
            raise ValueError(f"backend 'triton' under TRITON_INTERPRET=1 runs on CPU tensors, not on {device}")
        if not INTERPRETER and device.type != "cuda":
            raise ValueError(f"backend 'triton' needs a CUDA GPU, not {device} (on a CPU it runs only under "
                             f"TRITON_INTERPRET=1, set before aigc_rt.kernels is imported; slow, for tests)")
        super().__init__(device)
        # AIGC_RT_CUDA_GRAPHS=0 runs the decode step and the image models eagerly (same static buffers, no capture)
        capture = device.type == "cuda" and os.environ.get("AIGC_RT_CUDA_GRAPHS") != "0"
        self.decode_graph = DecodeGraph(capture)
        self.layer_graphs = DecodeGraph(capture)  # the image models' forwards, apart from the decode steps' LRU
        self.prefill_graphs = DecodeGraph(capture, size=PREFILL_GRAPH_MAX_T // PREFILL_ROWS)
        self.graph_prefill = capture  # tests turn it on where nothing is captured (the static path runs eagerly)
        self.counters = new_counters(device)  # the fused sub-layers' and the sampler's (made here: never in a capture)

    def prepare_linear(self, weight: torch.Tensor, bias: torch.Tensor | None,
                       scale: torch.Tensor | None = None) -> Linear:
        lin = super().prepare_linear(weight, bias, scale)
        if lin.weight.dtype == torch.uint8 and not INT4_GEMV:  # int4 dequantised once, rounded to bf16
            lin = Linear(lin.dequantized().bfloat16(), lin.bias)
        return Linear(*(None if t is None else t.contiguous() for t in (lin.weight, lin.bias, lin.scale)))

    def linear(self, x, lin: Linear, act=None, *, out=None, residual=None):
        # with a residual, the result is added into it in the kernel's epilogue (out is left alone)
        return _linear(lin)(x, lin.weight, lin.bias, act, scale=lin.scale, residual=residual,
                            out=out if residual is None else None)

    def layernorm_linear(self, x, ln_w, ln_b, eps, lin: Linear, act=None, *, norm_out=None, out=None):
        if x.numel() // x.shape[-1] > NORM_IN_PROLOGUE_MAX_ROWS:
            return super().layernorm_linear(x, ln_w, ln_b, eps, lin, act, norm_out=norm_out, out=out)
        return _linear(lin)(x, lin.weight, lin.bias, act, scale=lin.scale, norm=(ln_w, ln_b, eps), out=out)

    def mlp(self, x, ln_w, ln_b, eps, fc: Linear, proj: Linear, act="gelu_tanh", *, norm_out=None, hidden_out=None,
            out=None):
        def run(how: str):
            if how == "fused":
                return mlp.mlp(x, fc.weight, fc.bias, proj.weight, proj.bias, act, scale1=fc.scale, scale2=proj.scale,
                               norm=(ln_w, ln_b, eps), counters=self.counters)
            return super(TritonBackend, self).mlp(x, ln_w, ln_b, eps, fc, proj, act, norm_out=norm_out,
                                                  hidden_out=hidden_out, out=out)
        rows = x.numel() // x.shape[-1]
        fuse = FUSED_MLP and _fusable(rows, fc, proj)
        return run(_pick(fuse, x, run, ("mlp", type(self).__name__, rows, *fc.weight.shape, fc.weight.dtype, act)))

    def append_attention_decode_proj(self, q, k, v, k_cache, v_cache, positions, lengths, max_len, proj: Linear, *,
                                     residual, attn_out, out=None):
        def run(how: str):
            if how == "fused":
                return decode_attention.attention_decode(q, k_cache, v_cache, lengths, max_len, new_kv=(k, v),
                                                         positions=positions, proj=(proj.weight, proj.bias, proj.scale),
                                                         residual=residual, counters=self.counters)
            return super(TritonBackend, self).append_attention_decode_proj(
                q, k, v, k_cache, v_cache, positions, lengths, max_len, proj, residual=residual, attn_out=attn_out,
                out=out)
        fuse = FUSED_ATTN_PROJ and _fusable(q.shape[0], proj)
        key = ("attn_proj", type(self).__name__, *q.shape, k_cache.shape[2], k_cache.dtype, *proj.weight.shape,
               proj.weight.dtype)
        return run(_pick(fuse, residual, run, key))

    def attention_block_decode(self, x, ln_w, ln_b, eps, qkv: Linear, proj: Linear, k_cache, v_cache, positions,
                               lengths, max_len, *, norm_out=None, qkv_out=None, attn_out=None, out=None):
        def run(how: str):
            if how in BLOCK_SHAPES:
                return decode_attention.attention_block(x, (ln_w, ln_b, eps), (qkv.weight, qkv.bias, qkv.scale),
                                                        (proj.weight, proj.bias, proj.scale), k_cache, v_cache,
                                                        positions, lengths, counters=self.counters, shape=how,
                                                        qkv_out=qkv_out)
            return super(TritonBackend, self).attention_block_decode(
                x, ln_w, ln_b, eps, qkv, proj, k_cache, v_cache, positions, lengths, max_len, norm_out=norm_out,
                qkv_out=qkv_out, attn_out=attn_out, out=out)
        B, (H, S, D) = x.shape[0], k_cache.shape[1:]
        fuse = FUSED_QKV and _fusable(B, qkv, proj) and decode_attention.one_pass(B, H, S, D, x.device)
        key = ("attn_block", type(self).__name__, B, H, S, D, k_cache.dtype, *qkv.weight.shape, qkv.weight.dtype)
        return run(_pick(fuse, x, run, key, fused=BLOCK_SHAPES))

    def embedding(self, table, ids, *, scale=None, pos_table=None, positions=None, out=None):
        return embedding.embedding(table, ids, scale=scale, pos_table=pos_table, positions=positions, out=out)

    def layernorm(self, x, w, b, eps, *, out=None):
        return layernorm.layernorm(x, w, b, eps, out=out)

    def attention_prefill(self, q, k, v, *, out=None):
        return attention.attention_prefill(q, k, v, out=out)

    def write_kv(self, k_cache, v_cache, positions, k, v):
        decode_attention.write_kv(k_cache, v_cache, positions, k, v)

    def append_attention_decode(self, q, k, v, k_cache, v_cache, positions, lengths, max_len, *, out=None):
        return decode_attention.attention_decode(q, k_cache, v_cache, lengths, max_len, out=out, new_kv=(k, v),
                                                 positions=positions)

    def attention_decode(self, q, k_cache, v_cache, lengths, max_len, *, out=None):
        return decode_attention.attention_decode(q, k_cache, v_cache, lengths, max_len, out=out)

    def lstm_cell(self, gates, c, *, h_out=None, c_out=None):
        return lstm.lstm_cell(gates, c, h_out=h_out, c_out=c_out)

    def reparameterize(self, head, eps):
        return vae.reparameterize(head.contiguous(), eps.contiguous())

    def bernoulli_elbo(self, logits, x, head):
        return vae.bernoulli_elbo(logits.contiguous(), x.contiguous(), head.contiguous())

    def bernoulli_log_likelihood(self, logits, x):
        return vae.bernoulli_log_likelihood(logits.contiguous(), x.contiguous())

    def sample(self, logits, params, u, seen, *, out=None):
        return sampling.sample(logits.contiguous(), params, u.float().contiguous(), seen, out=out,
                               counters=self.counters)

    def run_decode(self, step, tokens, positions, lengths, cache, max_len):
        return self.decode_graph.decode(step, tokens, positions, lengths, cache)

    def run_prefill(self, first_logits, ids, lengths, cache):
        B, T = ids.shape
        padded = min(-(-T // PREFILL_ROWS) * PREFILL_ROWS, cache.max_len)
        if not self.graph_prefill or padded > PREFILL_GRAPH_MAX_T:
            return first_logits(ids, cache, lengths)
        if padded > T:
            ids = torch.nn.functional.pad(ids, (0, padded - T))
        key = ("prefill", first_logits, B, padded, cache.addresses(B))
        return self.prefill_graphs.run(key, lambda i, n: first_logits(i, cache, n), ids, lengths)

    def sample_step(self, logits, params, state):
        """TorchBackend's, with the positions' advance and the seen set's update done by the sampler's last kernel
        (kernels/sampling.py _finish): a launch fewer a step, three with a repetition penalty."""
        sampling.sample(logits, params, state.u, state.seen, out=state.tokens, advance=state.positions,
                        mark_seen=state.seen is not None, counters=self.counters)

    def run_decode_sample(self, step, state, cache, max_len, params):
        B = state.tokens.shape[0]
        key = ("sample", step, B, cache.max_len, cache.addresses(B), state.addresses(), params)
        return self.decode_graph.replay(key, lambda: self.decode_sample_steps(_eager, step, state, cache,
                                                                              cache.max_len, params))

    def run_layers(self, model, forward, *inputs):
        """An image model's whole forward as one CUDA graph per model, forward (a discriminator's score or logits, a
        VAE's decoder or ELBO...) and input shapes and dtypes (a generator's 4-5 launches at batch 1 cost more on
        the host than on the GPU); the output is cloned out of the graph's pool."""
        key = ("layers", model, forward.__name__, *((tuple(x.shape), x.dtype) for x in inputs))
        return self.layer_graphs.run(key, forward, *inputs).clone()

    # DCGAN generator (kernels/conv_transpose.py) and discriminator (kernels/conv2d.py). A bf16 file's weights stay
    # bf16: the kernels round each layer's input to bf16 and multiply on the tensor cores (utils.conv_dot), the
    # cpu backend's arithmetic; out_bf16 layers store their outputs rounded, as the next layer would round them.
    def prepare_conv_transpose(self, weight, bias, stride, padding, output_padding) -> Conv:
        layer = super().prepare_conv_transpose(weight, bias, stride, padding, output_padding)
        # logically (C_in, C_out, k, k), [k, k, C_in, C_out] in memory: a tap's (C_in, C_out) block loads coalesced
        w = _conv_weight(layer).permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
        return dataclasses.replace(layer, weight=w, bias=layer.bias.contiguous())

    def conv_transpose(self, x, layer: Conv, act, out_bf16=False):
        return conv_transpose.conv_transpose2d(x, layer.weight, layer.bias, layer.stride, layer.padding,
                                               layer.output_padding, act, out_dtype=_conv_out(out_bf16))

    def prepare_conv2d(self, weight, bias, stride, padding) -> Conv:
        layer = super().prepare_conv2d(weight, bias, stride, padding)
        # logically (C_out, C_in, k, k), [k, k, C_in, C_out] in memory: a tap's (C_in, C_out) block loads coalesced
        w = _conv_weight(layer).permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
        return dataclasses.replace(layer, weight=w, bias=layer.bias.contiguous())

    def conv2d(self, x, layer: Conv, act, leaky_slope=0.2, out_bf16=False):
        return conv2d.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, act, leaky_slope,
                             out_dtype=_conv_out(out_bf16))


def _fusable(rows: int, *linears: Linear) -> bool:
    """Whether a sub-layer of `rows` rows over these linears may run as one kernel: a decode step's few rows, and
    weights of one dtype that the fused kernels take (not int4)."""
    dtype = linears[0].weight.dtype
    return rows <= FUSED_MAX_ROWS and dtype != torch.uint8 and all(lin.weight.dtype == dtype for lin in linears)


def _pick(fuse: bool, y: torch.Tensor, run, key: tuple, fused: tuple[str, ...] = ("fused",)) -> str:
    """"composed" or one of `fused` (the fused kernel's launch shapes; the first the default) for a sub-layer that
    run(how) runs each way, y its output (added into in place): on a GPU, among the fused shapes that passed their
    check (_fused_agrees), with autotuning on, whichever is the fastest for the shape (timed on its first launch, y
    put back after: linear._faster); elsewhere fused[0] where allowed."""
    if not fuse:
        return "composed"
    agreed = _fused_agrees(key, y, run, fused)
    if not agreed:
        return "composed"
    if y.is_cuda and linear.AUTOTUNE:
        return linear._faster(key, y, run, choices=("composed", *agreed))
    return agreed[0]


def _fused_agrees(key: tuple, y: torch.Tensor, run, shapes: tuple[str, ...] = ("fused",)) -> tuple[str, ...]:
    """The launch shapes of sub-layer `key`'s fused kernel that may run (FUSED_CHECK_RTOL above): checked on its first
    launch on a GPU (or with CHECK_FUSED_ON_CPU) by running it composed, then each shape twice, from the same input
    (y, the output added into in place, is put back after each run) and comparing what each added to y. A shape
    first launched while a CUDA graph is captured cannot be checked (nothing runs) and is composed in that graph;
    the decode graphs run their step eagerly before they capture it, so this does not happen there."""
    ok = _checked.get(key)
    if ok is not None:
        return ok
    if not (y.is_cuda or CHECK_FUSED_ON_CPU):
        return shapes  # the interpreter: its tests compare every fused kernel with its reference
    if y.is_cuda and torch.cuda.is_current_stream_capturing():
        return ()
    kept = y.clone()

    def added(how: str) -> torch.Tensor:
        run(how)
        diff = y - kept
        y.copy_(kept)
        return diff
    composed = added("composed")
    if not bool(torch.isfinite(composed).all()):  # NaN or inf in the input or weights: nothing to judge by (and
        return ()  # the generation's NaN check names it); composed this time, checked again next time
    largest, passed = composed.abs().max().item(), []
    for how in shapes:
        fused, again = added(how), added(how)
        err = (fused - composed).abs().max().item()
        repeats = torch.equal(fused, again)
        if repeats and err <= FUSED_CHECK_RTOL * largest + 1e-6:  # False when err is NaN
            passed.append(how)
            continue
        shape = "" if how == shapes[0] else f" ({how} launch shape)"
        warnings.warn(f"aigc_rt: the fused {key[0]} kernel{shape} disagrees with its kernels apart on its first launch "
                      f"(shape {key[2:]}: max |difference| {err:.3g}, largest output {largest:.3g}"
                      f"{'' if repeats else ', and not the same bits when run again'}); at these sizes it runs "
                      f"{'without that launch shape' if len(shapes) > 1 else 'its kernels apart'}. Please report it.",
                      RuntimeWarning, stacklevel=3)
    ok = _checked[key] = tuple(passed)
    return ok


def _linear_int4(x, w, b, act, *, scale, **kw):
    """kernels/linear.py's linear_int4 called as its linear is (scale as a keyword)."""
    return linear.linear_int4(x, w, scale, b, act, **kw)


def _linear(lin: Linear):
    """The launcher for a prepared linear's weights: kernels/linear.py's linear, or its linear_int4 for int4 files
    (weight as nibble pairs, scale per row and group)."""
    return _linear_int4 if lin.weight.dtype == torch.uint8 else linear.linear


def _conv_weight(layer: Conv) -> torch.Tensor:
    """The weight as the Triton convolutions take it: bf16 again for a bf16 file (exact: the torch backend holds
    its values in fp32), else fp32."""
    return layer.weight.to(torch.bfloat16) if layer.bf16 else layer.weight


def _conv_out(out_bf16: bool) -> torch.dtype:
    return torch.bfloat16 if out_bf16 else torch.float32


def _eager(step, *args):
    """decode for decode_sample_steps inside a graph: the step itself."""
    return step(*args)
