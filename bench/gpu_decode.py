"""GPT-2 decode on a GPU, in one run: Hugging Face eager, HF static cache + torch.compile, and aigc_rt's triton
backend (CUDA-graph decode step) through generate(), and its decode step alone ("triton-step"), on random-init
models of the real GPT-2 shapes (no downloads). "cuda" / "cuda-step": the same on the cuda backend (the triton
backend with csrc/cuda's GEMV for the batch-1 decode linears).

    python bench/gpu_decode.py [--sizes 124M,355M,774M,1.5B] [--batches 1,8] [--dtypes fp32,bf16]  # or int8, int4
                               [--systems hf-eager,hf-compile,triton,triton-step] [--prompt 32] [--new-tokens 128]
                               [--reuse-hf bench/results]   # HF rows of earlier runs on this device and software

Each system greedily decodes --new-tokens tokens after a --prompt-token prompt (eos off). The time of one decode
step is (time of generating N tokens - time of generating 1) / (N - 1), medians of --repeats runs, so the
prefill drops out. Reported per row: ms/token (one decode step; every sequence of the batch gets a token), TTFT
(time to first token: the median time of generating 1 token, prefill included), tokens/s (batch x steps per
second), and % of the HBM roofline: tokens/s over batch x bandwidth / bytes read per step, where bytes = the
weights (matrices in the row's dtype, biases and LayerNorm in fp32; wte read once as the lm_head, embedding rows
only indexed) + the KV cache up to the mean context, and the bandwidth is measured in the same run (a device-
wide sum over a 2 GiB tensor). Results go to bench/results/gpu_decode-<device>-<date>.{md,json}. Targets (issue
6): 124M batch 1 >= 5,000 tokens/s on an H100 and >= 1.5x the best torch configuration; 774M and 1.5B >= 75% of
the HBM roofline.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from aigc_rt.models.gpt2 import kv_cache_dtype

SIZES = {  # name -> (n_layer, n_embd, n_head); vocab 50,257, context 1,024
    "124M": (12, 768, 12), "355M": (24, 1024, 16), "774M": (36, 1280, 20), "1.5B": (48, 1600, 25)}
VOCAB, CONTEXT = 50257, 1024
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "int4": 0.5 + 4 / 64}  # bytes a matrix entry (scales in)
HF_DTYPES = ("fp32", "bf16", "fp16")  # the quantised files run on ours alone (no HF rows: "vs best torch" is -)
# triton-step: the decode step without generate(); "-pdl": with programmatic dependent launch (AIGC_RT_PDL);
# triton-topk: generate() sampling as seed system 1 does (do_sample, temperature 0.7, top-k 50), not greedy;
# cuda, cuda-step: the cuda backend's
SYSTEMS = ("hf-eager", "hf-compile", "triton", "triton-step", "triton-pdl", "triton-step-pdl", "triton-topk",
           "cuda", "cuda-step")
SEED_SYSTEM_SAMPLING = dict(do_sample=True, temperature=0.7, top_k=50, seed=0)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# -- the roofline arithmetic (CPU-only; tests/test_gpu_decode_bench.py checks it) ----------------------------
def weight_bytes(size: str, dtype: str) -> int:
    """Bytes of weights one decode step reads: per block 12 C^2 matrix entries (qkv 3C^2, proj C^2, fc 4C^2,
    proj 4C^2) in `dtype` plus 13 C fp32 (biases 9 C, two LayerNorms 4 C); ln_f 2 C fp32; lm_head V C."""
    n_layer, C, _ = SIZES[size]
    head = ITEMSIZE["int8"] if dtype == "int4" else ITEMSIZE[dtype]  # an int4 file's wte (lm_head) is int8
    return int(n_layer * (12 * C * C * ITEMSIZE[dtype] + 13 * C * 4) + 2 * C * 4 + VOCAB * C * head)


def kv_bytes(size: str, batch: int, context: float, itemsize: int) -> float:
    """Bytes of keys and values one decode step reads for `batch` sequences of `context` cached positions."""
    n_layer, C, _ = SIZES[size]
    return 2 * n_layer * batch * context * C * itemsize


def roofline_tokens_per_s(bytes_per_step: float, batch: int, bandwidth: float) -> float:
    """The decode rate if every step only streamed its bytes at `bandwidth` (bytes/s): batch tokens a step."""
    return batch * bandwidth / bytes_per_step


@dataclass
class Row:
    size: str
    dtype: str
    batch: int
    system: str
    ms_per_token: float | None  # one decode step
    tokens_per_s: float | None
    roofline_tokens_per_s: float
    error: str | None = None
    ttft_ms: float | None = None  # generating 1 token: the prefill and the first sample
    reused: str | None = None  # the date of the earlier run this (HF) row was measured in, if not this one

    @property
    def roofline_pct(self) -> float | None:
        return None if self.tokens_per_s is None else 100 * self.tokens_per_s / self.roofline_tokens_per_s


def make_row(size, dtype, batch, system, step_seconds, bandwidth, prompt, new_tokens, error=None,
             first_seconds=None, reused=None) -> Row:
    """A result row from the measured seconds per decode step (None when the system failed) and of generating
    one token (TTFT)."""
    # ours: GPT2.kv_dtype's default for the file's dtype; HF's KV cache is in the model dtype
    kv_itemsize = ITEMSIZE[dtype] if system.startswith("hf") else kv_cache_dtype(dtype).itemsize
    context = prompt + (new_tokens + 1) / 2  # mean cached length over the decode steps
    roof = roofline_tokens_per_s(weight_bytes(size, dtype) + kv_bytes(size, batch, context, kv_itemsize), batch,
                                 bandwidth)
    if step_seconds is None:
        return Row(size, dtype, batch, system, None, None, roof, error)
    return Row(size, dtype, batch, system, 1e3 * step_seconds, batch / step_seconds, roof,
               ttft_ms=None if first_seconds is None else 1e3 * first_seconds, reused=reused)


def format_table(rows: list[Row]) -> str:
    """Markdown table; `vs best torch` is tokens/s over the better HF configuration of the same size, dtype
    and batch."""
    best = {}
    for r in rows:
        if r.system.startswith("hf") and r.tokens_per_s is not None:
            key = (r.size, r.dtype, r.batch)
            best[key] = max(best.get(key, 0.0), r.tokens_per_s)
    lines = ["| size | dtype | batch | system | ms/token | tokens/s | % of HBM roofline | vs best torch | TTFT ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.tokens_per_s is None:
            lines.append(f"| {r.size} | {r.dtype} | {r.batch} | {r.system} | failed: {r.error} | | | | |")
            continue
        ref = best.get((r.size, r.dtype, r.batch))
        ratio = f"{r.tokens_per_s / ref:.2f}x" if ref else "-"
        ttft = "-" if r.ttft_ms is None else f"{r.ttft_ms:.2f}"
        system = r.system + (f" (run of {r.reused})" if r.reused else "")
        lines.append(f"| {r.size} | {r.dtype} | {r.batch} | {system} | {r.ms_per_token:.3f} | "
                     f"{r.tokens_per_s:,.0f} | {r.roofline_pct:.1f}% | {ratio} | {ttft} |")
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    """The issue's targets, checked on the end-to-end rows (system "triton": generate())."""
    out = []
    for r in rows:
        if r.system != "triton" or r.tokens_per_s is None:
            continue
        torch_best = max((o.tokens_per_s for o in rows if o.system.startswith("hf") and o.tokens_per_s is not None
                          and (o.size, o.dtype, o.batch) == (r.size, r.dtype, r.batch)), default=None)
        if r.size == "124M" and r.batch == 1:
            ok = r.tokens_per_s >= 5000 and (torch_best is None or r.tokens_per_s >= 1.5 * torch_best)
            vs = "no torch row" if torch_best is None else f"{r.tokens_per_s / torch_best:.2f}x best torch"
            out.append(f"124M {r.dtype} batch 1: {r.tokens_per_s:,.0f} tokens/s, {vs} -> "
                       f"{'PASS' if ok else 'FAIL'} (target >= 5,000 and >= 1.5x)")
        if r.size in ("774M", "1.5B"):
            out.append(f"{r.size} {r.dtype} batch {r.batch}: {r.roofline_pct:.1f}% of roofline -> "
                       f"{'PASS' if r.roofline_pct >= 75 else 'FAIL'} (target >= 75%)")
    return out


def reusable_hf_rows(directory: str, meta: dict) -> dict[tuple, tuple[dict, str]]:
    """The HF rows of earlier result files in `directory` (gpu_decode-*.json) that this run need not measure
    again: HF's code is not ours, so its speed changes only with the device and the software. A row is taken
    from a file of the same device, torch (and transformers, where both files name it), prompt and new tokens,
    the newest file winning; a row that was itself reused is not taken again. (size, dtype, batch, system) ->
    (the row as saved, the date of its run)."""
    found = {}
    files = [os.path.join(directory, f) for f in os.listdir(directory) if f.startswith("gpu_decode-")
             and f.endswith(".json")] if os.path.isdir(directory) else []
    runs = []
    for path in files:
        with open(path) as f:
            data = json.load(f)
        old = data.get("meta", {})
        same = all(old.get(k) == meta.get(k) for k in ("device", "torch", "prompt", "new_tokens"))
        if same and (old.get("transformers") is None or meta.get("transformers") is None
                     or old["transformers"] == meta["transformers"]):
            runs.append((old.get("date", ""), data["rows"]))
    for date, rows in sorted(runs, key=lambda run: run[0]):  # newer runs overwrite older ones
        for r in rows:
            if r["system"].startswith("hf") and r.get("ms_per_token") is not None and not r.get("reused"):
                found[(r["size"], r["dtype"], r["batch"], r["system"])] = (r, date[:10])
    return found


# -- measurement (GPU) ------------------------------------------------------------------------------------
def event_seconds(fn, repeats: int) -> float:
    """Median seconds of fn() on the device, timed with CUDA events (fn warmed up by the caller)."""
    import torch
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_bandwidth(gib: int = 2, repeats: int = 20) -> float:
    """Device read bandwidth in bytes/s: the median time of a sum over a `gib` GiB fp32 tensor."""
    import torch
    x = torch.ones((gib << 30) // 4, device="cuda")
    x.sum()
    seconds = event_seconds(x.sum, repeats)
    del x
    torch.cuda.empty_cache()
    return (gib << 30) / seconds


def step_seconds(generate, new_tokens: int, repeats: int, graphs=None) -> tuple[float, float]:
    """(seconds per decode step of generate(n) (which makes n tokens), prefill excluded; seconds of
    generate(1), the time to the first token). graphs: the model's DecodeGraph, whose captures during the timed
    runs (after the warm-up) are reported: each would add an eager step and a capture to a timed run."""
    import torch

    def timed(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(n)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(new_tokens)  # warm-up: compilation, graph capture
    timed(1)
    captured = graphs.captures if graphs is not None else 0
    full = statistics.median(timed(new_tokens) for _ in range(repeats))
    first = statistics.median(timed(1) for _ in range(repeats))
    if graphs is not None and graphs.captures != captured:
        print(f"warning: {graphs.captures - captured} CUDA-graph captures during the timed runs", flush=True)
    return (full - first) / (new_tokens - 1), first


def hf_checkpoint(size: str, folder: str):
    """A random-init GPT2LMHeadModel of this size saved (fp32, with a small byte-level BPE tokenizer) to
    `folder`; returns the model (CPU, fp32, eval)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel
    n_layer, C, H = SIZES[size]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=C, n_layer=n_layer, n_head=H))
    model.eval().save_pretrained(folder)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(["a small corpus for a benchmark tokenizer"] * 4, vocab_size=300,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return model


def run_hf(model, dtype: str, prompts, new_tokens: int, repeats: int, compiled: bool) -> tuple[float, float]:
    import torch
    model.to("cuda", {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    model.generation_config.eos_token_id = None
    ids = prompts.cuda()
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    if compiled:  # HF's recipe (transformers >= 4.48): with a static KV cache, generate() compiles the decoding
        torch._dynamo.reset()  # forward itself (torch.compile, mode "reduce-overhead": CUDA graphs). Compiling
        kw["cache_implementation"] = "static"  # model.forward on top of that fails on replayed outputs.
    try:
        with torch.inference_mode():
            secs = step_seconds(lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw),
                                new_tokens, repeats)
        if compiled and getattr(model, "_compiled_call", None) is None:
            raise RuntimeError("transformers did not compile the decoding step (no static-cache auto-compile)")
        return secs
    finally:
        for attr in ("_compiled_call", "_last_compile_config", "_cache"):  # a fresh compile per configuration
            model.__dict__.pop(attr, None)
        model.to("cpu", torch.float32)
        torch.cuda.empty_cache()


def run_ours(folder: str, dtype: str, prompts, new_tokens: int, repeats: int, steps_only: bool,
             pdl: bool = False, sample: bool = False, backend: str = "triton") -> tuple[float, float]:
    """generate() through the public API; with steps_only, the decode step alone: prefill, then decode +
    greedy sample per token with the tokens fed back on the device and no host sync until the end (what a
    generation loop without per-token host work would reach). pdl: kernels launched with programmatic
    dependent launch. sample: generate() with seed system 1's sampling instead of greedy. backend: "triton" or
    "cuda"."""
    import torch

    import aigc_rt
    from aigc_rt.kernels import utils
    utils.PDL_REQUESTED = pdl
    with tempfile.TemporaryDirectory() as tmp:
        m = aigc_rt.load(aigc_rt.convert(folder, os.path.join(tmp, "m.safetensors"), dtype=dtype), device="cuda",
                         backend=backend)
    ids = prompts.cuda()

    def steps(n):
        decode_steps(m, ids, n)

    def generate(n):
        m.generate(prompts.tolist(), max_new_tokens=n, eos_token_id=[], **(SEED_SYSTEM_SAMPLING if sample else {}))

    try:
        return step_seconds(steps if steps_only else generate, new_tokens, repeats, m.backend.decode_graph)
    finally:
        utils.PDL_REQUESTED = False
        del m
        torch.cuda.empty_cache()


def decode_steps(m, ids, n: int):
    """Prefill, then n - 1 steps of decode + greedy sampling (on a GPU one graph replay each, as generate() runs
    them) with the tokens fed back on the device and no host sync: the step loop without generate()'s per-token
    host work. ids (B, T) on the model's device. Returns the generation's DecodeState (its tokens: the n-th new
    tokens)."""
    import torch

    from aigc_rt.generation import capacity
    from aigc_rt.sampling import SamplingParams
    B, T = ids.shape
    greedy = SamplingParams()
    with torch.inference_mode():  # the buffers generate() would run on (capacity and pool as it takes them)
        lease = m.decode_buffers.take(m, B, capacity(m.config.n_positions, T + n), penalty=False)
        cache, state = lease.cache, lease.state
        state.positions.fill_(T)
        lengths = torch.full((B,), T, device=ids.device)
        m.backend.sample(m.backend.run_prefill(m.first_logits, ids, lengths, cache), greedy, state.u, None,
                         out=state.tokens)  # the prefill as generate() runs it (replayed, for a short prompt)
        for i in range(n - 1):
            m.decode_sample(state, cache, T + i + 1, greedy)
    m.decode_buffers.give_back(lease)
    return state


def run(sizes, batches, dtypes, systems, prompt: int, new_tokens: int, repeats: int,
        tag: str = "", reuse_hf: str | None = None) -> tuple[list[Row], dict]:
    """Measures every configuration (but the HF rows reusable_hf_rows finds in `reuse_hf`, a results folder);
    the result files are rewritten after each row, so a run stopped by a time limit keeps the rows it finished."""
    import torch
    import transformers
    bandwidth = measure_bandwidth()
    meta = dict(device=torch.cuda.get_device_name(), bandwidth_GBps=bandwidth / 1e9, torch=torch.__version__,
                transformers=transformers.__version__, prompt=prompt, new_tokens=new_tokens, repeats=repeats,
                date=time.strftime("%Y-%m-%d %H:%M"), tag=tag)
    earlier = reusable_hf_rows(reuse_hf, meta) if reuse_hf else {}
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as folder:
            model = hf_checkpoint(size, folder)
            for dtype in dtypes:
                for batch in batches:
                    prompts = torch.randint(0, VOCAB, (batch, prompt), generator=torch.Generator().manual_seed(1))
                    for system in systems:
                        if system.startswith("hf") and dtype not in HF_DTYPES:
                            continue
                        old = earlier.get((size, dtype, batch, system))
                        if old is not None:  # measured by an earlier run on this device and software
                            r, date = old
                            ttft = r.get("ttft_ms")
                            rows.append(make_row(size, dtype, batch, system, r["ms_per_token"] / 1e3, bandwidth,
                                                 prompt, new_tokens, None, ttft and ttft / 1e3, reused=date))
                            continue
                        try:
                            if not system.startswith("hf"):  # triton[-step][-pdl], triton-topk, cuda[-step]
                                backend = system.split("-")[0]
                                secs, first = run_ours(folder, dtype, prompts, new_tokens, repeats,
                                                       system.startswith(f"{backend}-step"), system.endswith("-pdl"),
                                                       system == "triton-topk", backend)
                            else:
                                secs, first = run_hf(model, dtype, prompts, new_tokens, repeats, system == "hf-compile")
                            error = None
                        except Exception as e:  # a failing configuration is a row, not the end of the run
                            secs, first, error = None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                        rows.append(make_row(size, dtype, batch, system, secs, bandwidth, prompt, new_tokens, error,
                                             first))
                        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
                        save(rows, meta)
    return rows, meta


def save(rows: list[Row], meta: dict, directory: str = RESULTS_DIR) -> str:
    """Write <directory>/gpu_decode-<device>-<date>[-<tag>].md and .json; returns the .md path."""
    os.makedirs(directory, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "-" for ch in meta["device"]).strip("-").lower()
    tag = "".join(ch if ch.isalnum() or ch in "._" else "-" for ch in meta.get("tag") or "")
    base = os.path.join(directory, f"gpu_decode-{slug}-{meta['date'][:10]}" + (f"-{tag}" if tag else ""))
    md = (f"# GPT-2 decode on {meta['device']}\n\n{meta['date']}; measured read bandwidth "
          f"{meta['bandwidth_GBps']:.0f} GB/s; torch {meta['torch']}; prompt {meta['prompt']}, "
          f"{meta['new_tokens']} new tokens, greedy (triton-topk: temperature 0.7, top-k 50), median of "
          f"{meta['repeats']}. A system marked \"run of DATE\" was measured by that earlier run on the same device "
          f"and software (--reuse-hf), its % of roofline against this run's bandwidth.\n\n{format_table(rows)}\n\n"
          + "\n".join(f"- {v}" for v in verdicts(rows)) + "\n")
    with open(base + ".md", "w") as f:
        f.write(md)
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=[{**asdict(r), "roofline_pct": r.roofline_pct} for r in rows]), f, indent=1)
    return base + ".md"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tag", default="", help="appended to the result files' names")
    ap.add_argument("--reuse-hf", metavar="DIR", help="take the HF rows that earlier result files in DIR hold "
                    "for this device and software instead of measuring them again (see reusable_hf_rows)")
    a = ap.parse_args(argv)
    sizes, dtypes, systems = a.sizes.split(","), a.dtypes.split(","), a.systems.split(",")
    for name, values, known in (("size", sizes, SIZES), ("dtype", dtypes, ITEMSIZE), ("system", systems, SYSTEMS)):
        bad = [v for v in values if v not in known]
        if bad:
            ap.error(f"unknown {name} {bad}; choose from {list(known)}")
    import torch
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    rows, meta = run(sizes, [int(b) for b in a.batches.split(",")], dtypes, systems, a.prompt, a.new_tokens,
                     a.repeats, a.tag, a.reuse_hf)
    print(f"\n{format_table(rows)}\n" + "\n".join(verdicts(rows)) + f"\nsaved {save(rows, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
