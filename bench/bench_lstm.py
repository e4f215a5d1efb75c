"""The seed LSTM text generator (Embedding -> LSTM -> Linear), greedy decoding on the CPU: torch.nn (the reference
loop a user writes: the module carries its (h, c) from token to token) and aigc_rt's cpu backend, in one run.

    flock -x /tmp/aigc_rt-quiet.lock .venv/bin/python bench/bench_lstm.py [--repeats 3]

Two random-init shapes of what char-RNN / word-LSTM articles train: "char-512" (96 characters, 128 -> 512 x 2,
3.6 M parameters, 14 MB in fp32: mostly in cache) and "word-1024" (a 10,000-word vocabulary, 256 -> 1024 x 2,
24 M parameters streamed per token, 95 MB in fp32: memory-bound). Batch 1 and 8, prompt 32, 128 new tokens.
Reports decode tokens/s, ms/step, time to first token, the ratio to the faster torch fp32 configuration (see
SYSTEMS), the share of greedy tokens identical to its (fp32 100%; bf16 / int8 flip near-ties of these random
models' flat logits, after which a continuation differs), and the weight traffic (bytes streamed per step: every matrix once, the embedding only
indexed) as GB/s and % of the read bandwidth probed beside each row (aigc_rt.bench.BandwidthProbe).
Writes bench/results/lstm_<cpu>.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
import warnings

import torch

import aigc_rt
from aigc_rt import bench
from aigc_rt.config import LSTMConfig
from aigc_rt.convert.lstm import ReferenceLSTM

SHAPES = {"char-512": LSTMConfig(vocab_size=96, n_embd=128, hidden_size=512, n_layer=2),
          "word-1024": LSTMConfig(vocab_size=10_000, n_embd=256, hidden_size=1024, n_layer=2)}
# torch: nn.LSTM as it runs by default (on the CPU through oneDNN); torch-native: with oneDNN off
# (torch.backends.mkldnn.flags(enabled=False)), which at batch 1 is ~10x faster in fp32 here (oneDNN's LSTM costs
# ~5 ms a call for a 3.6 M-parameter model on the 2-core EPYC). Ratios are to the faster torch fp32 of the two.
SYSTEMS = ("torch:fp32", "torch-native:fp32", "torch:bf16", "aigc-rt:fp32", "aigc-rt:bf16", "aigc-rt:int8")
TORCH_FP32 = ("torch:fp32", "torch-native:fp32")


class TorchLoop:
    """The reference: prompt through the module at once, then one token at a time with its state."""

    def __init__(self, module: ReferenceLSTM, dtype: str, onednn: bool = True):
        self.module = module if dtype == "fp32" else ReferenceLSTM(*_sizes(module)).to(torch.bfloat16).eval()
        if dtype != "fp32":
            self.module.load_state_dict(module.state_dict())
        self.onednn = onednn

    def generate(self, ids: torch.Tensor, new_tokens: int) -> bench.Timing:
        with warnings.catch_warnings():  # mkldnn.flags() warns about TF32 on Intel GPUs at every entry
            warnings.simplefilter("ignore", UserWarning)
            with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=self.onednn):
                return self._generate(ids, new_tokens)

    def _generate(self, ids: torch.Tensor, new_tokens: int) -> bench.Timing:
        t0 = time.perf_counter()
        logits, state = self.module(ids.t())  # (T, B, V)
        tok = logits[-1].argmax(-1)  # (B,)
        first, out = time.perf_counter(), [tok]
        for _ in range(new_tokens - 1):
            logits, state = self.module(tok[None], state)
            tok = logits[-1].argmax(-1)
            out.append(tok)
        t1 = time.perf_counter()
        return bench.Timing(first - t0, t1 - first, torch.stack(out, 1).tolist())


def _sizes(m: ReferenceLSTM) -> tuple[int, int, int, int]:
    return m.embedding.num_embeddings, m.embedding.embedding_dim, m.lstm.hidden_size, m.lstm.num_layers


def run(shapes, batches, repeats: int, new_tokens: int = 128, prompt_len: int = 32, log=print):
    probe = bench.BandwidthProbe()
    bandwidth = probe()
    log(f"read bandwidth {bandwidth:.1f} GB/s ({torch.get_num_threads()} threads)")
    rows = []
    for name in shapes:
        c = SHAPES[name]
        torch.manual_seed(0)
        module = ReferenceLSTM(c.vocab_size, c.n_embd, c.hidden_size, c.n_layer).eval()
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(module.state_dict(), os.path.join(tmp, "m.pt"))
            with open(os.path.join(tmp, "vocab.json"), "w") as f:  # a character per id: any vocabulary size
                json.dump([chr(0x4E00 + i) for i in range(c.vocab_size)], f)
            systems = {}
            for spec in SYSTEMS:
                kind, dtype = spec.split(":")
                if kind.startswith("torch"):
                    systems[spec] = TorchLoop(module, dtype, onednn=kind == "torch")
                else:
                    path = aigc_rt.convert(os.path.join(tmp, "m.pt"), os.path.join(tmp, f"{dtype}.safetensors"),
                                           dtype=dtype, tokenizer=os.path.join(tmp, "vocab.json"))
                    systems[spec] = bench.AigcRt(path, "cpu")
            for batch in batches:
                ids = bench.prompts(batch, prompt_len, c.vocab_size)
                timed = bench.round_robin(systems, ids, new_tokens, repeats, probe)
                reference = min((timed[spec][0] for spec in TORCH_FP32), key=lambda t: t.decode_s)
                for spec, (t, row_bandwidth) in timed.items():
                    kind, dtype = spec.split(":")
                    r = bench.result(name, batch, kind, dtype, t, bench.streamed_bytes(c, dtype, "lstm"),
                                     row_bandwidth, reference, new_tokens)
                    rows.append(r)
                    log(_row(r))
    return rows, bandwidth


HEADER = ("| shape | batch | system | dtype | tokens/s | ms/step | TTFT ms | vs best torch fp32 | GB/s | read GB/s "
          "| % roofline | same tokens as best torch fp32 |\n" + "|---" * 12 + "|")


def _row(r: bench.Result) -> str:
    return (f"| {r.size} | {r.batch} | {r.system} | {r.dtype} | {r.tokens_per_s:.0f} | {r.ms_per_step:.3f} | "
            f"{r.ttft_ms:.1f} | {r.vs_hf_eager:.2f}x | {r.gb_per_s:.1f} | {r.read_gb_per_s:.1f} | "
            f"{r.roofline_pct:.0f}% | {100 * r.same_tokens_as_hf:.0f}% |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    rows, bandwidth = run(a.shapes.split(","), [int(b) for b in a.batches.split(",")], a.repeats)
    cpu, day = bench.cpu_name(), datetime.date.today().isoformat()
    slug = "".join(ch if ch.isalnum() else "-" for ch in cpu).strip("-").lower()
    path = os.path.join(a.out, f"lstm_{slug}.md")
    with open(path, "w") as f:
        f.write(f"# LSTM text generator, greedy decode, {cpu}, {day}\n\n{torch.get_num_threads()} threads, torch "
                f"{torch.__version__}, read bandwidth {bandwidth:.1f} GB/s at the start; prompt 32, 128 new tokens, "
                f"median of {a.repeats} round-robin runs (bench/bench_lstm.py).\n\n"
                + "\n".join([HEADER, *map(_row, rows)]) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
