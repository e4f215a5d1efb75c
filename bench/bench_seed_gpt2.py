"""Seed system 1's two calls, as the articles make them, timed end to end: Hugging Face `generate` (the reference
PyTorch code) against aigc_rt's `generate` with the same parameters, in one run, on the CPU or a CUDA GPU.

    flock -x /tmp/aigc_rt-quiet.lock .venv/bin/python bench/bench_seed_gpt2.py [--size 124M] [--repeats 3]
    python bench/bench_seed_gpt2.py --device cuda    # on a GPU box: HF eager on the GPU vs the triton backend

The calls (../shared/SEED_SYSTEMS.md, system 1):
  story   generate(input_ids, max_length=100, do_sample=True, top_k=50, temperature=0.7, num_return_sequences=1)
  five    generate(input_ids, max_length=50, num_return_sequences=5, temperature=0.9), with do_sample=True (Hugging
          Face refuses several sequences from greedy decoding) and top_k=50 (its default, which aigc_rt's generate
          does not apply unless asked)
on a random-init GPT-2 of the given size (aigc_rt.bench.make_checkpoint) with an 8-token prompt, the end-of-text
token disabled so that every call runs to max_length. Before timing, each aigc_rt dtype runs both calls with
top_k=1 (greedy) and must give Hugging Face's greedy tokens (fp32: all of them; bf16 / int8 / int4 round the logits, so
only the share that agrees is reported). Then `repeats` rounds run every system once in turn (these machines are
shared); the table has the median ms per call, new tokens/s over all sequences, and the ratio to Hugging Face.
Writes bench/results/seed_gpt2_<cpu or GPU>.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch

import aigc_rt
from aigc_rt import bench

CALLS = {
    "story": dict(max_length=100, do_sample=True, top_k=50, temperature=0.7, num_return_sequences=1),
    "five": dict(max_length=50, do_sample=True, top_k=50, temperature=0.9, num_return_sequences=5),
}
DTYPES = ("fp32", "bf16", "int8", "int4")
PROMPT_LEN = 8


def hf_call(hf, ids: list[int], call: dict) -> list[list[int]]:
    """Hugging Face generate, as seed system 1 calls it, without an end-of-text token -> the new tokens of each
    sequence."""
    x = torch.tensor([ids], device=hf.device)
    config = copy.deepcopy(hf.generation_config)  # the caller's model keeps its own
    config.update(**call, pad_token_id=0, eos_token_id=None)  # no eos: every call runs to max_length, as ours
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), generation_config=config)
    return out[:, len(ids):].tolist()


def ours_call(model, ids: list[int], call: dict) -> list[list[int]]:
    return [c.token_ids for c in model.generate(ids, eos_token_id=[], seed=0, **call)]


def greedy_agreement(hf, model, ids: list[int]) -> float:
    """The share of the greedy tokens (both calls with top_k=1) that are Hugging Face's."""
    same = total = 0
    for call in CALLS.values():
        greedy = dict(call, top_k=1)
        want, got = hf_call(hf, ids, greedy), ours_call(model, ids, greedy)
        for w, g in zip(want, got):
            same += sum(a == b for a, b in zip(w, g))
            total += len(w)
    return same / total


def run(hf, files: dict[str, str], repeats: int, log=print) -> list[dict]:
    """-> rows {call, system, dtype, ms, tokens_per_s, vs_hf, greedy}. hf: the eval-mode GPT2LMHeadModel, on the
    device to run on; files: dtype -> its converted runtime file (loaded on hf's device, its default backend)."""
    ids = bench.prompts(1, PROMPT_LEN, hf.config.vocab_size)[0].tolist()
    systems = {("hf-eager", "fp32"): lambda call: hf_call(hf, ids, call)}
    agreement = {}
    for dtype, path in files.items():
        model = aigc_rt.load(path, device=hf.device)
        agreement[dtype] = greedy_agreement(hf, model, ids)
        if dtype == "fp32" and agreement[dtype] < 1:
            raise AssertionError(f"aigc_rt fp32 greedy tokens differ from Hugging Face's "
                                 f"({agreement[dtype]:.0%} agree): not timing a wrong model")
        systems[("aigc-rt", dtype)] = lambda call, model=model: ours_call(model, ids, call)
    times = {(name, key): [] for name in CALLS for key in systems}
    for name, call in CALLS.items():
        for run_call in systems.values():
            run_call(call)  # warm-up
    for r in range(repeats):
        for name, call in CALLS.items():
            for key, run_call in systems.items():
                t0 = time.perf_counter()
                out = run_call(call)
                times[(name, key)].append(time.perf_counter() - t0)
                assert len(out) == call["num_return_sequences"]
                assert all(len(s) == call["max_length"] - PROMPT_LEN for s in out), [len(s) for s in out]
        log(f"round {r + 1}/{repeats} done")
    rows = []
    for name, call in CALLS.items():
        hf_s = statistics.median(times[(name, ("hf-eager", "fp32"))])
        new_tokens = call["num_return_sequences"] * (call["max_length"] - PROMPT_LEN)
        for key in systems:
            s = statistics.median(times[(name, key)])
            rows.append(dict(call=name, system=key[0], dtype=key[1], ms=s * 1e3, tokens_per_s=new_tokens / s,
                             vs_hf=hf_s / s, greedy=agreement.get(key[1]) if key[0] == "aigc-rt" else None))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| call | system | dtype | ms / call | new tokens/s | vs HF eager | greedy tokens as HF's |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        greedy = "" if r["greedy"] is None else f"{r['greedy']:.0%}"
        lines.append(f"| {r['call']} | {r['system']} | {r['dtype']} | {r['ms']:,.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['vs_hf']:.2f}x | {greedy} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="124M", choices=sorted(bench.SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        hf, files, _ = bench.prepare(args.size, folder, DTYPES)
        rows = run(hf.eval().to(args.device), files, args.repeats, log=lambda s: print(s, file=sys.stderr, flush=True))
    name = bench.device_name(args.device)
    where = "" if args.device == "cuda" else f", {torch.get_num_threads()} threads"
    text = (f"# Seed system 1's generate calls, GPT-2 {args.size} (random init), {name}\n\n{datetime.date.today()}, "
            f"torch {torch.__version__}{where}, prompt {PROMPT_LEN} tokens, median of "
            f"{args.repeats} round-robin runs (bench/bench_seed_gpt2.py: the calls and the checks).\n\n"
            f"{table(rows)}\n")
    print(text)
    out = bench.save_markdown(text, os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), "seed_gpt2",
                              args.device)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
