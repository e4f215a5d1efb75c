"""The `torch` backend: plain PyTorch on any device. It is the reference every other backend is tested
against, so it favours clarity over speed (fp32 math; low-precision weights are upcast per call).

Every op takes a keyword-only `out=`: a preallocated fp32 tensor of the result's shape that the result is
written into (and returned). Models pass it on the decode path so that a step allocates nothing; here
the result is computed and then copied, which is enough for a reference."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..format import INT4_GROUP, dequantize_int4, dequantize_int8
from ..sampling import SamplingParams, sample_reference

ACTIVATIONS = (None, "gelu_tanh", "relu")


@dataclass
class Linear:
    weight: torch.Tensor  # (out, in), as stored in the file
    bias: torch.Tensor | None  # (out,) fp32
    scale: torch.Tensor | None = None  # int8: (out,) fp32, W = weight * scale[:, None]; int4: (out, groups) fp32

    def dequantized(self) -> torch.Tensor:
        """The weight (out, in) in fp32 (int8 and int4 weights times their scales; format.py)."""
        if self.weight.dtype == torch.uint8:
            return dequantize_int4(self.weight, self.scale)
        if self.weight.dtype == torch.int8:
            return dequantize_int8(self.weight, self.scale)
        return self.weight.float()


def check_quantized(weight: torch.Tensor, scale: torch.Tensor | None) -> None:
    """A scale comes with int8 weights ((out,)) and int4 ones (uint8 nibble pairs (out, in / 2) with (out,
    ceil(in / 64)) scales), and only with them."""
    if (weight.dtype in (torch.int8, torch.uint8)) != (scale is not None):
        raise ValueError(f"a scale is required for int8 and int4 weights and only for them (weight {weight.dtype}, "
                         f"scale {'given' if scale is not None else 'missing'})")
    if weight.dtype == torch.uint8:
        groups = -(-2 * weight.shape[-1] // INT4_GROUP)
        if weight.dim() != 2 or tuple(scale.shape) != (weight.shape[0], groups):
            raise ValueError(f"int4 weight {tuple(weight.shape)} (nibble pairs) needs scales ({weight.shape[0]}, "
                             f"{groups}), got {tuple(scale.shape)}")


def check_activation(act) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; choose one of {ACTIVATIONS}")


@contextlib.contextmanager
def fp32_convolutions():
    """cuDNN runs float32 convolutions in TF32 unless told otherwise (torch.backends.cudnn.allow_tf32 is on by
    default), ~1e-3 relative error: the reference backend's convolutions, and the references of our
    kernels, run in full fp32."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _into(out: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """y, or y copied into the caller's buffer `out` (which must have y's shape)."""
    if out is None:
        return y
    if out.shape != y.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(y.shape)}")
    return out.copy_(y)


@dataclass
class Conv:
    weight: torch.Tensor  # ConvTranspose2d (in, out, k, k) / Conv2d (out, in, k, k) fp32 (triton: bf16 if bf16)
    bias: torch.Tensor  # (out,) fp32
    stride: int
    padding: int
    output_padding: int = 0  # transposed convs only
    bf16: bool = False  # bf16 weights (held here as their exact fp32 values): the input is rounded to bf16 first


def conv_input(x: torch.Tensor, layer: Conv) -> torch.Tensor:
    """A layer's input as it multiplies it: rounded to bf16 (and back to fp32) for bf16 weights."""
    return x.bfloat16().float() if layer.bf16 else x


CONV_ACTIVATIONS = {  # the DCGAN layers' activations: act(y, leaky slope)
    "none": lambda y, slope: y,
    "relu": lambda y, slope: F.relu(y),
    "tanh": lambda y, slope: torch.tanh(y),
    "leaky_relu": lambda y, slope: F.leaky_relu(y, slope),
    "sigmoid": lambda y, slope: torch.sigmoid(y),
}


class TorchBackend:
    name = "torch"

    def __init__(self, device: torch.device):
        self.device = device

    # -- weights -------------------------------------------------------------------------------------
    def prepare_linear(self, weight: torch.Tensor, bias: torch.Tensor | None,
                       scale: torch.Tensor | None = None) -> Linear:
        """weight (out, in) as stored in the file (int4: (out, in / 2) nibble pairs); scale for int8 and int4 weights
        (and only for them): check_quantized."""
        check_quantized(weight, scale)
        return Linear(weight.to(self.device), None if bias is None else bias.to(self.device, torch.float32, copy=True),
                      None if scale is None else scale.to(self.device, torch.float32, copy=True))

    # -- ops -----------------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, lin: Linear, act: str | None = None, *, out: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) fp32 -> y (..., out) fp32; act None, "gelu_tanh" or "relu". fp32 math: int8 and int4 weights
        are dequantised (q * scale); for bf16/fp16 weights the activations are rounded to the weight dtype too
        (the math of a bf16 x bf16 -> fp32 dot product). With residual ((..., out) fp32, contiguous; a
        pre-norm block's residual stream): residual += y in place, and residual is returned; out is then scratch
        a backend may write y into (the cpu backend does, the triton backend adds straight into residual)."""
        check_activation(act)
        if lin.scale is not None:
            w = lin.dequantized()
        else:
            w, x = lin.weight.float(), x.to(lin.weight.dtype).float()
        y = F.linear(x, w, lin.bias)
        y = F.gelu(y, approximate="tanh") if act == "gelu_tanh" else F.relu(y) if act == "relu" else y
        return _into(out, y) if residual is None else residual.add_(y)

    def layernorm_linear(self, x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float, lin,
                         act: str | None = None, *, norm_out: torch.Tensor | None = None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
        """linear(layernorm(x), lin, act): a pre-norm sub-layer's input projection. norm_out ((..., in) fp32):
        where layernorm(x) goes on its way (scratch: the triton backend normalises in the linear's prologue
        and never writes it)."""
        return self.linear(self.layernorm(x, ln_w, ln_b, eps, out=norm_out), lin, act, out=out)

    def mlp(self, x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float, fc, proj,
            act: str | None = "gelu_tanh", *, norm_out: torch.Tensor | None = None,
            hidden_out: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """A pre-norm block's MLP sub-layer: x += linear(act(linear(layernorm(x), fc)), proj) in place; returns x
        ((..., C) fp32, contiguous). norm_out (..., C), hidden_out (..., H) and out (..., C): scratch for the two
        linears (layernorm_linear's norm_out and out, linear's out); a backend that runs the sub-layer as one
        kernel (the triton backend, for decode's few rows) leaves them alone."""
        h = self.layernorm_linear(x, ln_w, ln_b, eps, fc, act, norm_out=norm_out, out=hidden_out)
        return self.linear(h, proj, out=out, residual=x)

    def embedding(self, table: torch.Tensor, ids: torch.Tensor, *, scale: torch.Tensor | None = None,
                  pos_table: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows table[ids] as fp32, (*ids.shape, C); int8 tables (with scale (V,)) are dequantised. With a
        position table (P, C) fp32 and positions (ids' shape), pos_table[positions] is added."""
        if (pos_table is None) != (positions is None):
            raise ValueError("embedding: pos_table and positions go together (one was given without the other)")
        rows = table[ids].float()
        if scale is not None:
            rows = rows * scale[ids].unsqueeze(-1)
        return _into(out, rows if pos_table is None else rows + pos_table[positions])

    def layernorm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        return _into(out, F.layer_norm(x, (x.shape[-1],), w, b, eps))

    def attention_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                          out: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention. q, k, v (B, H, T, D) -> (B, H, T, D); scale 1/sqrt(D). out may be strided."""
        return _into(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> None:
        """Append a decode step's keys and values: k_cache[b, :, positions[b]] = k[b] (and v), rounded to the
        cache's dtype. Caches (B, H, S, D) fp32 or bf16; k, v (B, H, D) fp32; positions (B,) int64."""
        B, H, _, D = k_cache.shape
        slots = positions.view(B, 1, 1, 1).expand(B, H, 1, D)  # (B, H, 1, D): where each row's k, v go
        k_cache.scatter_(2, slots, k.unsqueeze(2).to(k_cache.dtype))
        v_cache.scatter_(2, slots, v.unsqueeze(2).to(v_cache.dtype))

    def append_attention_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                                v_cache: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, max_len: int,
                                *, out: torch.Tensor | None = None) -> torch.Tensor:
        """A decode step's attention: write_kv(k_cache, v_cache, positions, k, v), then attention_decode of q
        over the caches. A backend may do both in one kernel (triton)."""
        self.write_kv(k_cache, v_cache, positions, k, v)
        return self.attention_decode(q, k_cache, v_cache, lengths, max_len, out=out)

    def append_attention_decode_proj(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                                     v_cache: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                                     max_len: int, proj, *, residual: torch.Tensor, attn_out: torch.Tensor,
                                     out: torch.Tensor | None = None) -> torch.Tensor:
        """A decode step's attention sub-layer past the qkv projection: append_attention_decode into attn_out
        ((B, H, D) fp32 scratch), then residual ((B, C) fp32) += linear(the heads side by side, proj), out ((B, C))
        the linear's scratch. Returns residual. A backend may run it all in one kernel (triton, for a few rows)."""
        a = self.append_attention_decode(q, k, v, k_cache, v_cache, positions, lengths, max_len, out=attn_out)
        return self.linear(a.view(a.shape[0], -1), proj, out=out, residual=residual)

    def attention_block_decode(self, x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, eps: float, qkv, proj,
                               k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                               lengths: torch.Tensor, max_len: int, *, norm_out: torch.Tensor | None = None,
                               qkv_out: torch.Tensor | None = None, attn_out: torch.Tensor | None = None,
                               out: torch.Tensor | None = None) -> torch.Tensor:
        """A decode step's whole pre-norm attention sub-layer: x ((B, C) fp32) += linear(attention(q, k, v), proj)
        with (q, k, v) = layernorm_linear(x, qkv) (q, k, v side by side) and this step's k, v appended to the
        caches (B, H, S, D) at positions; returns x. norm_out (B, C), qkv_out (B, 3C), attn_out (B, H, D), out
        (B, C): scratch. A backend may run it all in one kernel (triton, for a few rows over a short cache)."""
        _, H, _, D = k_cache.shape
        f = self.layernorm_linear(x, ln_w, ln_b, eps, qkv, norm_out=norm_out, out=qkv_out)
        q, k, v = f.view(-1, 3, H, D).unbind(1)  # (B, H, D) each
        return self.append_attention_decode_proj(q, k, v, k_cache, v_cache, positions, lengths, max_len, proj,
                                                 residual=x, attn_out=attn_out, out=out)

    def attention_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         lengths: torch.Tensor, max_len: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """One query per sequence. q (B, H, D) fp32; caches (B, H, S, D) fp32 or bf16 (widened to q.dtype);
        row b attends to its first lengths[b] cached positions; max_len >= max(lengths) (a host int).
        -> (B, H, D)."""
        valid = (torch.arange(max_len, device=q.device) < lengths[:, None])[:, None, :, None]  # (B, 1, S, 1)
        # cache slots past a row's length hold anything (even NaN): zero them rather than trust 0 * x == 0
        k = torch.where(valid, k_cache[:, :, :max_len].to(q.dtype), 0.0)
        v = torch.where(valid, v_cache[:, :, :max_len].to(q.dtype), 0.0)
        scores = torch.einsum("bhd,bhsd->bhs", q, k) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~valid[..., 0], -math.inf)
        return _into(out, torch.einsum("bhs,bhsd->bhd", scores.softmax(dim=-1), v))

    def lstm_cell(self, gates: torch.Tensor, c: torch.Tensor, *, h_out: torch.Tensor | None = None,
                  c_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """An LSTM step after its linears. gates (N, 4H) fp32 = x W_ih^T + h W_hh^T + b in torch's order (input,
        forget, cell, output); c (N, H) fp32 the previous cell state. -> (h', c') with
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g), h' = sigmoid(o) * tanh(c'). c_out may be c (in place)."""
        i, f, g, o = gates.chunk(4, dim=-1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        return _into(h_out, h_new), _into(c_out, c_new)

    def reparameterize(self, head: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """A VAE's z (S, N, L) = mu + eps * exp(logvar / 2) from its encoder's head (N, 2L) = (mu, logvar) and
        eps (S, N, L)."""
        L = head.shape[1] // 2
        return head[:, :L] + eps * torch.exp(0.5 * head[:, L:])

    def bernoulli_elbo(self, logits: torch.Tensor, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Each image's ELBO (N,): sum_d x log sigmoid(l) + (1 - x) log sigmoid(-l) for the decoder's logits l
        (S, N, D) and the images x (N, D), averaged over the S samples, minus KL(N(mu, exp(logvar)) || N(0, I)) =
        1/2 sum_j (mu^2 + exp(logvar) - logvar - 1) from head (N, 2L)."""
        L = head.shape[1] // 2
        mu, logvar = head[:, :L], head[:, L:]
        kl = 0.5 * (mu.square() + logvar.exp() - logvar - 1).sum(-1)  # (N,)
        return self.bernoulli_log_likelihood(logits, x).mean(0) - kl

    def bernoulli_log_likelihood(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) (S, N) of the images x (N, D) under each sample's logits (S, N, D): sum_d x log sigmoid(l)
        + (1 - x) log sigmoid(-l)."""
        # per sample: torch's fused kernel on contiguous (N, D) operands (a broadcast x takes a path ~3x slower)
        return torch.stack([-F.binary_cross_entropy_with_logits(l, x, reduction="none").sum(-1) for l in logits])

    def run_decode(self, step, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, cache,
                   max_len: int) -> torch.Tensor:
        """Run a model's decode step, step(tokens, positions, lengths, cache, max_len) -> logits; a backend may
        replay it instead (triton: from a CUDA graph; cpu: from a recorded list of its ops). A replayable step
        does all its work in backend ops, on its inputs, the cache and the cache's Workspace."""
        return step(tokens, positions, lengths, cache, max_len)

    def run_prefill(self, first_logits, ids: torch.Tensor, lengths: torch.Tensor, cache) -> torch.Tensor:
        """generate()'s prefill, first_logits(ids, cache, lengths) -> logits (B, V) (TextModel.first_logits); a
        backend may replay it (triton: from a CUDA graph per batch size and padded prompt length). The logits are
        read before the next generation's prefill, which may overwrite them."""
        return first_logits(ids, cache, lengths)

    def run_layers(self, model, forward, *inputs: torch.Tensor) -> torch.Tensor:
        """An image model's whole forward, forward(*inputs) -> y, with the inputs on the device; a backend may
        replay it (triton: from a CUDA graph per model, forward and input shapes). The result is the caller's: no
        later call overwrites it."""
        return forward(*inputs)

    def run_decode_sample(self, step, state, cache, max_len: int, params: SamplingParams) -> torch.Tensor:
        """A generation step in place on state (generation.DecodeState): run_decode on state.tokens and
        state.positions, sample the next tokens from its logits into state.tokens, advance the positions, mark
        the tokens seen. A backend may replay it all at once (triton: one CUDA graph). Returns the step's logits
        (B, V), a buffer the next step overwrites."""
        return self.decode_sample_steps(self.run_decode, step, state, cache, max_len, params)

    def decode_sample_steps(self, decode, step, state, cache, max_len: int, params: SamplingParams) -> torch.Tensor:
        """run_decode_sample's work, with decode(step, tokens, positions, lengths, cache, max_len) -> logits."""
        lengths = torch.add(state.positions, 1, out=cache.workspace(state.tokens.shape[0]).lengths)
        logits = decode(step, state.tokens, state.positions, lengths, cache, max_len)
        self.sample_step(logits, params, state)
        return logits

    def sample_step(self, logits: torch.Tensor, params: SamplingParams, state) -> None:
        """A step's end: the next tokens sampled from logits into state.tokens, the positions advanced, the tokens
        marked seen."""
        self.sample(logits, params, state.u, state.seen, out=state.tokens)
        state.positions.add_(1)
        state.mark_seen()

    # -- DCGAN -----------------------------------------------------------------------------------------
    def prepare_conv_transpose(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int,
                               output_padding: int) -> Conv:
        return Conv(weight.to(self.device, torch.float32), bias.to(self.device, torch.float32, copy=True), stride,
                    padding, output_padding, weight.dtype == torch.bfloat16)

    def conv_transpose(self, x: torch.Tensor, layer: Conv, act: str, out_bf16: bool = False) -> torch.Tensor:
        """act(conv_transpose2d(x) + bias). x (N, C_in, H, W) fp32 (or bf16) -> (N, C_out, H_out, W_out) fp32, with
        H_out = (H - 1) * stride - 2 * padding + k + output_padding; act "none", "relu" or "tanh". out_bf16: the
        caller only uses the output rounded to bf16 (it feeds a bf16 layer), so a backend may return it rounded, as
        a bfloat16 tensor (the cpu and triton backends do: half the writes, no rounding pass); this one returns
        fp32."""
        with fp32_convolutions():
            y = F.conv_transpose2d(conv_input(x, layer), layer.weight, layer.bias, layer.stride, layer.padding,
                                   layer.output_padding)
        return CONV_ACTIVATIONS[act](y, None)

    def prepare_conv2d(self, weight: torch.Tensor, bias: torch.Tensor, stride: int, padding: int) -> Conv:
        return Conv(weight.to(self.device, torch.float32), bias.to(self.device, torch.float32, copy=True), stride,
                    padding, bf16=weight.dtype == torch.bfloat16)

    def conv2d(self, x: torch.Tensor, layer: Conv, act: str, leaky_slope: float = 0.2,
               out_bf16: bool = False) -> torch.Tensor:
        """act(conv2d(x) + bias). x (N, C_in, H, W) fp32 (or bf16) -> (N, C_out, H_out, W_out) fp32; act "none",
        "leaky_relu" (negative slope leaky_slope) or "sigmoid". out_bf16: as conv_transpose's."""
        with fp32_convolutions():
            y = F.conv2d(conv_input(x, layer), layer.weight, layer.bias, layer.stride, layer.padding)
        return CONV_ACTIVATIONS[act](y, leaky_slope)

    def sample(self, logits: torch.Tensor, params: SamplingParams, u: torch.Tensor,
               seen: torch.Tensor | None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B, V) fp32 -> token ids (B,) int64; -1 marks a row with NaN/inf logits."""
        return _into(out, sample_reference(logits, params, u, seen))
