"""GPT-2 decode benchmark, shared by `aigc-rt bench` and the pytest-benchmark suite in bench/.

Every system generates greedily from the same random prompts (batch B, prompt_len tokens, new_tokens new
tokens, no eos) in one process, one after the other:

  hf-eager        Hugging Face transformers GPT2LMHeadModel.generate, eager, in the weights' dtype
  torch-compile   a hand-written PyTorch GPT-2 over a static KV cache (fixed shapes, masked SDPA), its decode
                  step under torch.compile (max-autotune, inductor freezing: weights prepacked), fp32/bf16
  torch-onednn    a hand-written PyTorch GPT-2 (static KV cache, SDPA) whose linears are prepacked for
                  oneDNN (torch.ops.mkldnn._linear_pointwise, what torch.compile's freezing pass emits), fp32/bf16
  torch-mkl       the same with MKL-packed fp32 linears (torch.ops.mkl._mkl_linear)
  torch-dynq      the same with torch.ao dynamic int8 linears (per-channel int8 weights, per-tensor int8
                  activations; quantized::linear_dynamic)
  torch-int4      the same in bf16 with torch's int4 weight-only linears for the blocks
                  (torch._weight_int4pack_mm_for_cpu, what torchao's int4 weight-only config runs on a CPU, with
                  our int4 file's values and group-64 scales; its fp32 and fp16 paths run at ~0.6 GB/s, bf16 at ~18)
                  and the dynamic int8 one for the lm_head, as our int4 files keep wte in int8
  aigc-rt         this runtime, `aigc_rt.load(file, backend=...)`, on the converted file of each dtype (fp32, fp16,
                  bf16, int8, int4)

and we report decode tokens/s (all sequences), ms per decode step, time to first token, the ratio to HF
eager fp32, and the weight traffic: bytes of weights streamed per decode step (every matrix once, wte once
as the lm_head; wpe and wte rows are only indexed) / step time, as GB/s and as % of the read bandwidth
measured beside it (BandwidthProbe: best of torch sum/dot and our int8 GEMV over 1 GiB, same threads, probed
before and after each timed run). Models are random-init at GPT-2 124M / 355M shapes,
built on the fly (no downloads).
"""
from __future__ import annotations

import copy
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import _C

SIZES = {"124M": dict(n_layer=12, n_embd=768, n_head=12), "355M": dict(n_layer=24, n_embd=1024, n_head=16)}
GPT2_VOCAB, GPT2_CONTEXT = 50257, 1024
SYSTEMS = ("hf-eager:fp32", "hf-eager:bf16", "torch-compile:fp32", "torch-compile:bf16", "torch-onednn:fp32",
           "torch-mkl:fp32", "torch-onednn:bf16", "torch-dynq:int8", "torch-int4:int4", "aigc-rt:fp32", "aigc-rt:fp16",
           "aigc-rt:bf16", "aigc-rt:int8", "aigc-rt:int4")
# (no hf-eager:fp16 by default: PyTorch's fp16 matmuls on CPUs without AVX512-FP16 are ~11x its fp32 ones, 336 ms a
# GPT-2 124M token on the 2-core Xeon of 2026-11-30: pass --systems hf-eager:fp16 to see it)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Timing:
    ttft_s: float  # prompt in -> first new token out
    decode_s: float  # the remaining new_tokens - 1 steps
    tokens: list[list[int]]  # new tokens per sequence


@dataclass
class Result:
    size: str
    batch: int
    system: str
    dtype: str
    tokens_per_s: float  # decoded tokens per second, all sequences
    ms_per_step: float
    ttft_ms: float
    weight_bytes: int  # streamed per decode step
    gb_per_s: float
    read_gb_per_s: float  # the machine's read bandwidth, probed around this row's runs
    roofline_pct: float  # gb_per_s / read_gb_per_s
    vs_hf_eager: float  # tokens/s ratio to hf-eager fp32, same size and batch
    same_tokens_as_hf: float  # fraction of new tokens identical to hf-eager fp32's (greedy)
    attn_sample_pct: float | None = None  # share of a decode step in attention_decode + sample (aigc-rt only)


# -- the machine ---------------------------------------------------------------------------------------
class BandwidthProbe:
    """Streaming read bandwidth in GB/s over `gib` GiB buffers (far beyond the caches): the best median of
    three probes, torch.sum and torch.dot over fp32 ones and a batch-1 int8 GEMV of our cpu kernels (torch's
    reductions alone stay ~25% below what a well-fed stream reaches on some CPUs, which would put a kernel
    above 100% of its roofline). Small models may still beat it a little: part of their weights stays in L3.

    The buffers stay allocated so that the benchmark can probe again around each system's runs: these machines
    are shared, and the bandwidth the neighbours leave moves by 30-50% within minutes (seen on the 2-core EPYC:
    25 to 51 GB/s in one hour), so a row's % of roofline is taken against the bandwidth probed beside it."""

    def __init__(self, gib: float = 1.0):
        self.bytes = int(gib * 2**30)
        self.ones = torch.ones(self.bytes // 4)
        rows = self.bytes // 4096
        self.gemv = _C.PackedLinear(torch.ones(rows, 4096, dtype=torch.int8), None, torch.ones(rows))
        self.x, self.y = torch.randn(1, 4096), torch.empty(1, rows)

    def __call__(self, repeats: int = 7) -> float:
        def median_gbps(probe) -> float:
            probe()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                probe()
                times.append(time.perf_counter() - t0)
            return self.bytes / statistics.median(times) / 1e9

        return max(median_gbps(lambda: self.ones.sum()), median_gbps(lambda: torch.dot(self.ones, self.ones)),
                   median_gbps(lambda: _C.linear(self.x, self.gemv, 0, self.y)))


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """One BandwidthProbe measurement, GB/s."""
    return BandwidthProbe(gib)(repeats)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def device_name(device: str) -> str:
    """What a results file names the machine by: the GPU's name for "cuda", else the CPU's."""
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def save_markdown(text: str, directory: str, stem: str, device: str) -> str:
    """Write a results table to directory/<stem>_<the device's name as a slug>.md; -> its path."""
    os.makedirs(directory, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    path = os.path.join(directory, f"{stem}_{slug}.md")
    with open(path, "w") as f:
        f.write(text)
    return path


# -- models ----------------------------------------------------------------------------------------------
def make_checkpoint(size: str, folder: str, seed: int = 0):
    """A random-init GPT-2 of the given size saved as a HF folder (with a byte-level tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=GPT2_VOCAB, n_positions=GPT2_CONTEXT, **SIZES[size])
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(folder)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.save(os.path.join(folder, "tokenizer.json"))
    return hf


def streamed_bytes(config, dtype: str, arch: str = "gpt2") -> int:
    """Bytes of weights one decode step reads: everything in the runtime file but what it only indexes (GPT-2's
    wpe; the LSTM's embedding)."""
    from .archs import lookup
    a = lookup(arch)
    return sum(torch.Size(shape).numel() * torch.empty(0, dtype=dt).element_size()
               for name, (shape, dt) in a.tensors(config, dtype).items() if name not in a.indexed)


class HFEager:
    def __init__(self, hf, dtype: str):
        self.model = hf if dtype == "fp32" else copy.deepcopy(hf).to(TORCH_DTYPES[dtype])
        self.model.generation_config.eos_token_id = None

    def generate(self, ids: torch.Tensor, new_tokens: int) -> Timing:
        from transformers.generation.streamers import BaseStreamer
        stamps = []

        class Clock(BaseStreamer):  # put() gets the prompt first, then each new token
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=Clock())
        t1 = time.perf_counter()
        return Timing(stamps[1] - t0, t1 - stamps[1], out[:, ids.shape[1]:].tolist())


# -- PyTorch's prepacked linears (the baselines here and in bench/bench_cpu_ops.py) ------------------------------
def onednn_linear(w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype, batch: int):
    """w (out, in) prepacked for oneDNN in `dtype` for `batch` rows (what torch.compile's freezing emits):
    -> x (batch, in) in `dtype` -> y."""
    w, b = w.to(dtype), None if b is None else b.to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, batch)
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


def mkl_linear(w: torch.Tensor, b: torch.Tensor | None, batch: int):
    """fp32 w (out, in) packed for MKL's sgemm: -> x (batch, in) fp32 -> y."""
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, batch)
    return lambda x: torch.ops.mkl._mkl_linear(x, packed, w, b, batch)


def dynq_linear(w: torch.Tensor, b: torch.Tensor | None):
    """torch's dynamic int8 linear (per-channel symmetric weights, activations quantised per call):
    -> x fp32 -> y fp32."""
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12).double()
    q = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(q, b)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True)


def int4_linear(w: torch.Tensor, b: torch.Tensor | None):
    """torch's int4 weight-only linear on a CPU over the values and scales of format.quantize_int4 (group 64, zero
    point 0; in a multiple of 64): -> x bf16 -> y bf16."""
    from .format import INT4_GROUP, quantize_int4, unpack_int4
    packed, scale = quantize_int4(w)
    weight = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).int(), 1)  # q + 8, as torch stores them
    scale_and_zero = torch.stack((scale.t(), torch.zeros_like(scale.t())), dim=2).bfloat16()  # (groups, out, 2)
    b = None if b is None else b.bfloat16()
    if b is None:
        return lambda x: torch._weight_int4pack_mm_for_cpu(x, weight, INT4_GROUP, scale_and_zero)
    return lambda x: torch._weight_int4pack_mm_for_cpu(x, weight, INT4_GROUP, scale_and_zero).add_(b)


class TorchGPT2:
    """GPT-2 decode written directly in PyTorch: static KV cache, SDPA, one of four prepacked linears."""

    def __init__(self, hf, linear: str, dtype: str, batch: int):
        self.dtype = {**TORCH_DTYPES, "int8": torch.float32, "int4": torch.bfloat16}[dtype]
        sd = {k.removeprefix("transformer."): v.detach().float() for k, v in hf.state_dict().items()}
        c = hf.config
        self.n_layer, self.H, self.C = c.n_layer, c.n_head, c.n_embd
        self.wte, self.wpe = sd["wte.weight"].to(self.dtype), sd["wpe.weight"].to(self.dtype)
        pack = {"onednn": lambda w, b, batch: onednn_linear(w, b, self.dtype, batch), "mkl": mkl_linear,
                "dynq": lambda w, b, batch: dynq_linear(w, b), "int4": lambda w, b, batch: int4_linear(w, b)}[linear]
        self.ln = [(sd[f"h.{i}.{n}.weight"].to(self.dtype), sd[f"h.{i}.{n}.bias"].to(self.dtype))
                   for i in range(c.n_layer) for n in ("ln_1", "ln_2")] + [(sd["ln_f.weight"].to(self.dtype),
                                                                          sd["ln_f.bias"].to(self.dtype))]
        self.lin = [pack(sd[f"h.{i}.{n}.weight"].t().contiguous(), sd[f"h.{i}.{n}.bias"], batch)  # Conv1D: [in, out]
                    for i in range(c.n_layer) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        if linear == "int4":  # the lm_head in int8, as in our int4 files
            head = dynq_linear(sd["wte.weight"], None)
            self.head = lambda x: head(x.float())
        else:
            self.head = pack(sd["wte.weight"], None, batch)

    def _forward(self, ids, pos0, k_cache, v_cache):  # ids (B, T) -> last position's logits (B, V)
        B, T = ids.shape
        H, C, D = self.H, self.C, self.C // self.H
        x = (self.wte[ids] + self.wpe[pos0: pos0 + T]).view(B * T, C)
        for i in range(self.n_layer):
            qkv = self.lin[4 * i](F.layer_norm(x, (C,), *self.ln[2 * i]))
            q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
            k_cache[i][:, :, pos0: pos0 + T] = k
            v_cache[i][:, :, pos0: pos0 + T] = v
            a = F.scaled_dot_product_attention(q, k_cache[i][:, :, : pos0 + T], v_cache[i][:, :, : pos0 + T],
                                               is_causal=T > 1)
            x = x + self.lin[4 * i + 1](a.transpose(1, 2).reshape(B * T, C))
            h = F.gelu(self.lin[4 * i + 2](F.layer_norm(x, (C,), *self.ln[2 * i + 1])), approximate="tanh")
            x = x + self.lin[4 * i + 3](h)
        h = F.layer_norm(x.view(B, T, C)[:, -1], (C,), *self.ln[-1])
        return self.head(h)

    def generate(self, ids: torch.Tensor, new_tokens: int) -> Timing:
        B, T = ids.shape
        shape = (B, self.H, T + new_tokens, self.C // self.H)
        k_cache = [torch.empty(shape, dtype=self.dtype) for _ in range(self.n_layer)]
        v_cache = [torch.empty(shape, dtype=self.dtype) for _ in range(self.n_layer)]
        out = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            tok = self._forward(ids, 0, k_cache, v_cache).argmax(-1)
            out.append(tok.tolist())
            t1 = time.perf_counter()
            for step in range(1, new_tokens):
                tok = self._forward(tok[:, None], T + step - 1, k_cache, v_cache).argmax(-1)
                out.append(tok.tolist())
            t2 = time.perf_counter()
        return Timing(t1 - t0, t2 - t1, [list(s) for s in zip(*out)])


class _StaticGPT2(torch.nn.Module):
    """The hand-written GPT-2 over a static KV cache for torch.compile: fixed shapes (the new k, v are written
    at a position tensor and attention masks the cache instead of slicing it), so one compiled
    graph serves every decode step. Weights are parameters, so inductor's freezing pass can prepack them."""

    def __init__(self, sd: dict, c, dtype: torch.dtype):
        super().__init__()
        self.n_layer, self.H, self.C = c.n_layer, c.n_head, c.n_embd
        self.w = torch.nn.ParameterList([torch.nn.Parameter(t.to(dtype), requires_grad=False) for t in (
            sd["wte.weight"], sd["wpe.weight"], sd["ln_f.weight"], sd["ln_f.bias"],
            *(sd[f"h.{i}.{n}.{p}"].t().contiguous() if p == "weight" and n.startswith(("attn", "mlp"))
              else sd[f"h.{i}.{n}.{p}"]  # Conv1D [in, out] -> Linear [out, in]
              for i in range(c.n_layer)
              for n in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
              for p in ("weight", "bias")))])

    def forward(self, ids, pos, k_cache, v_cache):  # ids (B, T), pos (T,), caches [(B, H, S, D)] per layer -> (B, V)
        B, T = ids.shape
        H, C, D = self.H, self.C, self.C // self.H
        wte, wpe, lnf_w, lnf_b = self.w[:4]
        x = (wte[ids] + wpe[pos]).view(B * T, C)
        mask = torch.arange(k_cache[0].shape[2], device=ids.device) <= pos[:, None]  # (T, S): causal, static cache
        for i in range(self.n_layer):
            ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, mp_w, mp_b = \
                self.w[4 + 12 * i: 16 + 12 * i]
            qkv = F.linear(F.layer_norm(x, (C,), ln1_w, ln1_b), qkv_w, qkv_b)
            q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
            k_cache[i].index_copy_(2, pos, k)  # one tensor per layer: inductor writes it in place
            v_cache[i].index_copy_(2, pos, v)
            a = F.scaled_dot_product_attention(q, k_cache[i], v_cache[i], attn_mask=mask)
            x = x + F.linear(a.transpose(1, 2).reshape(B * T, C), proj_w, proj_b)
            h = F.gelu(F.linear(F.layer_norm(x, (C,), ln2_w, ln2_b), fc_w, fc_b), approximate="tanh")
            x = x + F.linear(h, mp_w, mp_b)
        return F.linear(F.layer_norm(x.view(B, T, C)[:, -1], (C,), lnf_w, lnf_b), wte)


class TorchCompiled:
    """_StaticGPT2 under torch.compile with inductor's freezing (weights prepacked, constants folded) and
    max-autotune (GEMM templates timed against MKL/oneDNN per shape): the best torch.compile recipe we found for
    CPU decoding (default mode ran ~40% slower at batch 1 here; a single 5-D cache tensor instead of one per
    layer made inductor copy the whole cache at every step). The decode step is compiled once per batch size at the
    first generate() (the benchmark's warm-up run); the prompt runs eagerly (TTFT is eager PyTorch's). The
    cache holds a multiple of 256 positions, so the warm-up and the timed runs share one compiled graph."""

    def __init__(self, hf, dtype: str):
        self.dtype = TORCH_DTYPES[dtype]
        sd = {k.removeprefix("transformer."): v.detach().float() for k, v in hf.state_dict().items()}
        self.model = _StaticGPT2(sd, hf.config, self.dtype).eval()
        self.step = torch.compile(self.model, dynamic=False, mode="max-autotune-no-cudagraphs")

    def generate(self, ids: torch.Tensor, new_tokens: int) -> Timing:
        import torch._inductor.config as inductor_config
        m, (B, T) = self.model, ids.shape
        S = -(-(T + new_tokens) // 256) * 256
        k_cache, v_cache = ([torch.zeros(B, m.H, S, m.C // m.H, dtype=self.dtype) for _ in range(m.n_layer)]
                            for _ in range(2))
        out = []
        # freezing is read when the step compiles (its first call); patched here, not set for the whole process
        with torch.inference_mode(), inductor_config.patch(freezing=True):
            t0 = time.perf_counter()
            tok = m(ids, torch.arange(T), k_cache, v_cache).argmax(-1)
            out.append(tok.tolist())
            t1 = time.perf_counter()
            for step in range(1, new_tokens):
                tok = self.step(tok[:, None], torch.tensor([T + step - 1]), k_cache, v_cache).argmax(-1)
                out.append(tok.tolist())
            t2 = time.perf_counter()
        return Timing(t1 - t0, t2 - t1, [list(s) for s in zip(*out)])


class AigcRt:
    def __init__(self, path: str, backend: str, device: str = "cpu"):
        import aigc_rt
        self.model = aigc_rt.load(path, device=device, backend=backend)

    def generate(self, ids: torch.Tensor, new_tokens: int) -> Timing:
        from .generation import run
        t0 = time.perf_counter()
        first, tokens = None, [[] for _ in range(ids.shape[0])]
        for ev in run(self.model, ids.tolist(), max_new_tokens=new_tokens, eos_token_id=[]):
            first = first or time.perf_counter()
            tokens[ev.row].append(ev.token)
        t1 = time.perf_counter()
        return Timing(first - t0, t1 - first, tokens)

    def op_shares(self, ids: torch.Tensor, new_tokens: int) -> float:
        """% of the decode loop's time spent in attention_decode + sample (timed per call, a separate run, with the
        cpu backend's step replay off: a replayed step never calls back into Python, where the timers are)."""
        be = self.model.backend
        spent = {"attention_decode": 0.0, "sample": 0.0}
        replay = getattr(be, "replay", None)

        def timed(name):
            inner = getattr(be, name)

            def call(*args, **kwargs):
                t = time.perf_counter()
                r = inner(*args, **kwargs)
                spent[name] += time.perf_counter() - t
                return r
            return call

        for name in spent:
            setattr(be, name, timed(name))
        if replay is not None:
            be.replay = False
        try:
            timing = self.generate(ids, new_tokens)
        finally:
            for name in spent:
                delattr(be, name)
            if replay is not None:
                be.replay = replay
        return 100 * sum(spent.values()) / (timing.ttft_s + timing.decode_s)


def make_system(spec: str, hf, files: dict[str, str], backend: str, batch: int):
    """spec "name:dtype" (see SYSTEMS) -> an object with generate(ids, new_tokens) -> Timing."""
    name, dtype = spec.split(":")
    if name == "hf-eager":
        return HFEager(hf, dtype)
    if name == "aigc-rt":
        return AigcRt(files[dtype], backend)
    if name == "torch-compile":
        return TorchCompiled(hf, dtype)
    return TorchGPT2(hf, name.removeprefix("torch-"), dtype, batch)


def prepare(size: str, folder: str, dtypes=tuple(s.split(":")[1] for s in SYSTEMS if s.startswith("aigc-rt:"))):
    """(HF model, {dtype: runtime file}, GPT2Config) for a random-init GPT-2 of `size` built in `folder`."""
    import aigc_rt
    from .config import GPT2Config
    hf = make_checkpoint(size, folder)
    files = {dt: aigc_rt.convert(folder, os.path.join(folder, f"{dt}.safetensors"), dtype=dt) for dt in dtypes}
    return hf, files, GPT2Config(vocab_size=GPT2_VOCAB, n_positions=GPT2_CONTEXT, **SIZES[size])


def prompts(batch: int, prompt_len: int, vocab: int = GPT2_VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(0))


# -- the run -----------------------------------------------------------------------------------------------
def round_robin(systems: dict, ids: torch.Tensor, new_tokens: int, repeats: int, probe) -> dict:
    """Time every system on the same prompts: a short warm-up run each (torch-compile compiles then), then
    `repeats` rounds that run each system once in turn, so a shift in the bandwidth the machine's neighbours
    leave (these machines are shared) hits every system alike. The read bandwidth is probed between runs.
    -> {name: (Timing with the median TTFT and decode time, median of the probes just before and after that
    system's runs)}."""
    for system in systems.values():
        system.generate(ids, 4)
    runs = {name: [] for name in systems}
    probes = {name: [] for name in systems}
    last = probe(3)
    for _ in range(repeats):
        for name, system in systems.items():
            runs[name].append(system.generate(ids, new_tokens))
            probes[name] += [last, (last := probe(3))]
    return {name: (Timing(statistics.median(t.ttft_s for t in ts), statistics.median(t.decode_s for t in ts),
                          ts[0].tokens), statistics.median(probes[name]))
            for name, ts in runs.items()}


def run(sizes=("124M",), batches=(1, 8), systems=SYSTEMS, backend: str = "cpu", new_tokens: int = 128,
        prompt_len: int = 32, repeats: int = 3, log=print) -> tuple[list[Result], float]:
    """Benchmark every system on every (size, batch): the systems of one dtype round-robin, median of `repeats`
    runs; returns (results, read bandwidth GB/s at the start). Each row's % of roofline is against the bandwidth
    probed around its runs. Ratios are to hf-eager:fp32, which runs with the first dtype group."""
    probe = BandwidthProbe()
    bandwidth = probe()
    log(f"read bandwidth {bandwidth:.1f} GB/s ({torch.get_num_threads()} threads)")
    results = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            hf, files, config = prepare(size, tmp, [s.split(":")[1] for s in systems if s.startswith("aigc-rt:")])
            for batch in batches:
                ids = prompts(batch, prompt_len)
                timed, reference = {}, None
                # one dtype at a time (memory: 355M holds ~11 GB of weights per dtype group), round-robin within it
                for dtype in dict.fromkeys(spec.split(":")[1] for spec in systems):
                    runners = {spec: make_system(spec, hf, files, backend, batch) for spec in systems
                               if spec.split(":")[1] == dtype}
                    group = round_robin(runners, ids, new_tokens, repeats, probe)
                    timed.update(group)
                    reference = timed["hf-eager:fp32"][0] if "hf-eager:fp32" in timed else None
                    for spec, (t, row_bandwidth) in group.items():
                        name = spec.split(":")[0]
                        results.append(result(size, batch, name, dtype, t, streamed_bytes(config, dtype),
                                              row_bandwidth, reference, new_tokens))
                        if name == "aigc-rt":
                            results[-1].attn_sample_pct = runners[spec].op_shares(ids, new_tokens)
                        log(_row(results[-1]))
                    del runners, group
                    torch._dynamo.reset()  # compiled graphs hold their frozen weights: free them
                    gc.collect()
    return results, bandwidth


def run_file(path: str, backend: str = "cpu", batches=(1, 8), new_tokens: int = 128, prompt_len: int = 32,
             repeats: int = 3, log=print) -> tuple[list[Result], float]:
    """Benchmark one runtime file on aigc-rt alone (no reference to compare with)."""
    from .api import resolve_path
    probe = BandwidthProbe()
    bandwidth = probe()
    log(f"read bandwidth {bandwidth:.1f} GB/s ({torch.get_num_threads()} threads)")
    system = AigcRt(resolve_path(path), backend)
    m, results = system.model, []
    prompt_len = min(prompt_len, m.config.n_positions - new_tokens)
    for batch in batches:
        ids = prompts(batch, prompt_len, m.config.vocab_size)
        t, row_bandwidth = round_robin({"aigc-rt": system}, ids, new_tokens, repeats, probe)["aigc-rt"]
        results.append(result(os.path.basename(path), batch, f"aigc-rt/{backend}", m.dtype, t,
                              streamed_bytes(m.config, m.dtype, m.arch), row_bandwidth, None, new_tokens))
        results[-1].attn_sample_pct = system.op_shares(ids, new_tokens)
        log(_row(results[-1]))
    return results, bandwidth


def result(size, batch, name, dtype, t: Timing, weight_bytes, bandwidth, reference, new_tokens) -> Result:
    steps = new_tokens - 1
    step_s = t.decode_s / steps
    gbps = weight_bytes / step_s / 1e9
    ref_rate = batch * steps / reference.decode_s if reference else float("nan")
    same = (sum(a == b for x, y in zip(t.tokens, reference.tokens) for a, b in zip(x, y)) / (batch * new_tokens)
            if reference else float("nan"))
    return Result(size, batch, name, dtype, batch * steps / t.decode_s, 1e3 * step_s, 1e3 * t.ttft_s, weight_bytes,
                  gbps, bandwidth, 100 * gbps / bandwidth, batch * steps / t.decode_s / ref_rate, same)


HEADER = ("| model | batch | system | dtype | tokens/s | ms/step | TTFT ms | vs HF eager | GB/s | read GB/s "
          "| % roofline | same tokens as HF fp32 | attn+sample % |\n" + "|---" * 13 + "|")


def _row(r: Result) -> str:
    share = "" if r.attn_sample_pct is None else f"{r.attn_sample_pct:.0f}"
    ratio = "–" if math.isnan(r.vs_hf_eager) else f"{r.vs_hf_eager:.2f}x"  # no HF run: a file benchmarked alone
    same = "–" if math.isnan(r.same_tokens_as_hf) else f"{100 * r.same_tokens_as_hf:.0f}%"
    return (f"| {r.size} | {r.batch} | {r.system} | {r.dtype} | {r.tokens_per_s:.1f} | {r.ms_per_step:.2f} | "
            f"{r.ttft_ms:.0f} | {ratio} | {r.gb_per_s:.1f} | {r.read_gb_per_s:.1f} | {r.roofline_pct:.0f}% | {same} "
            f"| {share} |")


def table(results: list[Result]) -> str:
    return "\n".join([HEADER, *map(_row, results)])


def save(results: list[Result], bandwidth: float, out_dir: str, note: str = "") -> tuple[str, str]:
    """Write results as markdown and JSON under out_dir, named by date and CPU model; returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    cpu, day = cpu_name(), datetime.date.today().isoformat()
    slug = "".join(ch if ch.isalnum() else "-" for ch in cpu).strip("-").lower()
    stem = os.path.join(out_dir, f"{day}-{slug}-decode")
    meta = {"cpu": cpu, "date": day, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "read_bandwidth_gb_s": bandwidth, "note": note}
    with open(stem + ".json", "w") as f:
        json.dump({**meta, "results": [asdict(r) for r in results]}, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(f"# GPT-2 decode, {cpu}, {day}\n\n{torch.get_num_threads()} threads, torch {torch.__version__}, "
                f"read bandwidth {bandwidth:.1f} GB/s at the start (best of torch sum/dot and our int8 GEMV over "
                f"1 GiB); each row's % roofline is against the read bandwidth probed before and after its runs "
                f"(read GB/s, the median of those probes); the systems of one dtype run round-robin, median of the "
                f"runs. {note}\n\n{table(results)}\n")
    return stem + ".md", stem + ".json"
