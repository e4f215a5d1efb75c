"""The seed text models beside GPT-2, greedy decoding: torch.nn as a user runs it and aigc_rt, in one run, on the CPU
or on a CUDA GPU (--device cuda: cuDNN's LSTM and torch's CUDA ops against the triton backend and its CUDA graph).

    flock -x /tmp/aigc_rt-quiet.lock .venv/bin/python bench/bench_seed_text.py [--shapes ...] [--repeats 3]
    python bench/bench_seed_text.py --device cuda          # on a GPU box (tools/gpu_session.sh kernels)

Random-init shapes of what the articles train (prompt 32, 128 new tokens, batch 1 and 8):
  lstm-char   Embedding(96, 128) -> LSTM(128, 512, 2) -> Linear: 3.6 M parameters, 14 MB fp32 (mostly in cache)
  lstm-word   Embedding(10000, 256) -> LSTM(256, 1024, 2) -> Linear: 24 M parameters streamed a token, 95 MB fp32
  tdec-char   Embedding(96, 512) -> TransformerDecoder(d 512, 8 heads, 6 layers, FFN 2048) -> Linear (the seed
              system's sizes): 25 M parameters, 101 MB fp32
References (each system's greedy tokens are compared with the first fp32 reference's):
  LSTM: the module carrying its (h, c) from token to token, with torch's default oneDNN LSTM ("torch") and with
        oneDNN off ("torch-native", ~10x faster at batch 1 here: oneDNN's LSTM costs ~5 ms a call); bf16 too.
        On a GPU "torch" is cuDNN's LSTM (no "torch-native").
  Transformer decoder: nn.TransformerDecoder keeps no cache, so a user recomputes the whole sequence for every
        token ("torch"); aigc_rt's own torch backend (plain PyTorch ops, with the KV caches) is the cached
        PyTorch baseline ("aigc-rt/torch").
Ratios are to the fastest fp32 torch system of the shape. Also: ms/step, time to first token, the share of greedy
tokens identical to the reference's (bf16 / int8 flip near-ties of these random models' flat logits, after which
a continuation differs), and the weight traffic (every matrix once a step, the embedding only indexed) as GB/s
and % of the read bandwidth probed beside each row (aigc_rt.bench.BandwidthProbe; on a GPU a sum over 2 GiB of
device memory). Writes bench/results/seed_text_<cpu or GPU>.md.
"""
from __future__ import annotations

import argparse
import copy
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
from aigc_rt.config import LSTMConfig, TransformerDecoderConfig
from aigc_rt.convert.lstm import ReferenceLSTM
from aigc_rt.convert.transformer_decoder import ReferenceTransformerDecoder

SHAPES = {
    "lstm-char": LSTMConfig(vocab_size=96, n_embd=128, hidden_size=512, n_layer=2),
    "lstm-word": LSTMConfig(vocab_size=10_000, n_embd=256, hidden_size=1024, n_layer=2),
    "tdec-char": TransformerDecoderConfig(vocab_size=96, d_model=512, n_head=8, n_layer=6, d_ff=2048),
}
# system "name:dtype" per arch; the torch fp32 ones are the references. "aigc-rt" runs the device's default backend
# (cpu / triton), "aigc-rt/torch" the torch backend. torch-native (oneDNN off) is a CPU system only.
SYSTEMS = {
    "lstm": ("torch:fp32", "torch-native:fp32", "torch:bf16", "aigc-rt:fp32", "aigc-rt:bf16", "aigc-rt:int8"),
    "transformer_decoder": ("torch:fp32", "aigc-rt/torch:fp32", "aigc-rt:fp32", "aigc-rt:bf16", "aigc-rt:int8"),
}
REFERENCES = ("torch:fp32", "torch-native:fp32", "aigc-rt/torch:fp32")


def systems_for(arch: str, device: str) -> tuple[str, ...]:
    return tuple(s for s in SYSTEMS[arch] if device == "cpu" or not s.startswith("torch-native"))


class CudaProbe:
    """Device read bandwidth in GB/s (a sum over 2 GiB of fp32, median of CUDA-event timings: gpu_decode's), called
    as BandwidthProbe is: probe(repeats). The buffer stays allocated between probes."""

    def __init__(self, gib: int = 2):
        self.bytes = gib << 30
        self.ones = torch.ones(self.bytes // 4, device="cuda")

    def __call__(self, repeats: int = 7) -> float:
        from gpu_decode import event_seconds  # bench/, beside this script
        self.ones.sum()
        return self.bytes / event_seconds(self.ones.sum, repeats) / 1e9


def arch_of(config) -> str:
    return "lstm" if isinstance(config, LSTMConfig) else "transformer_decoder"


def reference_module(config) -> torch.nn.Module:
    if isinstance(config, LSTMConfig):
        return ReferenceLSTM(config.vocab_size, config.n_embd, config.hidden_size, config.n_layer).eval()
    return ReferenceTransformerDecoder(config.vocab_size, config.d_model, config.n_head, config.n_layer,
                                      config.d_ff).eval()


class TorchLoop:
    """A torch.nn module generating greedily: the LSTM prefills the prompt and then carries its state token by
    token; the Transformer decoder (no cache) runs the whole sequence again for every token."""

    def __init__(self, module: torch.nn.Module, dtype: str, onednn: bool = True, device: str = "cpu"):
        self.module = copy.deepcopy(module).to(device, torch.float32 if dtype == "fp32" else torch.bfloat16)
        self.recurrent = isinstance(module, ReferenceLSTM)
        self.onednn, self.device = onednn, device
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def generate(self, ids: torch.Tensor, new_tokens: int) -> bench.Timing:
        with warnings.catch_warnings():  # mkldnn.flags() warns about TF32 on Intel GPUs at every entry
            warnings.simplefilter("ignore", UserWarning)
            with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=self.onednn):
                return self._generate(ids.t().to(self.device), new_tokens)

    def _generate(self, ids: torch.Tensor, new_tokens: int) -> bench.Timing:  # ids (T, B)
        self.sync()
        t0 = time.perf_counter()
        logits, state = self._forward(ids, None)  # (T, B, V)
        tok = logits[-1].argmax(-1)  # (B,)
        tok.tolist()  # the first token on the host, as a streaming user sees it
        first, out = time.perf_counter(), [tok]
        for _ in range(new_tokens - 1):
            if self.recurrent:
                logits, state = self._forward(tok[None], state)
            else:
                ids = torch.cat([ids, tok[None]])
                logits, _ = self._forward(ids, None)
            tok = logits[-1].argmax(-1)
            out.append(tok)
        tokens = torch.stack(out, 1).tolist()  # waits for the device
        t1 = time.perf_counter()
        return bench.Timing(first - t0, t1 - first, tokens)

    def _forward(self, ids, state):
        return self.module(ids, state) if self.recurrent else (self.module(ids), None)


def run(shapes, batches, repeats: int, new_tokens: int = 128, prompt_len: int = 32, log=print, device: str = "cpu",
        backend: str = "auto"):
    """-> (result rows, the read bandwidth at the start in GB/s). backend: aigc-rt's ("auto": cpu / triton)."""
    probe = CudaProbe() if device == "cuda" else bench.BandwidthProbe()
    bandwidth = probe()
    log(f"read bandwidth {bandwidth:.1f} GB/s ({device}, {torch.get_num_threads()} CPU threads)")
    rows = []
    for name in shapes:
        c = SHAPES[name]
        arch = arch_of(c)
        torch.manual_seed(0)
        module = reference_module(c)
        with tempfile.TemporaryDirectory() as tmp:
            src, vocab = os.path.join(tmp, "m.pt"), os.path.join(tmp, "vocab.json")
            torch.save(module.state_dict(), src)
            with open(vocab, "w") as f:  # a character per id: any vocabulary size
                json.dump([chr(0x4E00 + i) for i in range(c.vocab_size)], f)
            config = {"n_head": c.n_head} if arch == "transformer_decoder" else None
            systems = {}
            for spec in systems_for(arch, device):
                kind, dtype = spec.split(":")
                if kind.startswith("torch"):
                    systems[spec] = TorchLoop(module, dtype, onednn=kind == "torch", device=device)
                    continue
                path = aigc_rt.convert(src, os.path.join(tmp, f"{dtype}.safetensors"), dtype=dtype, tokenizer=vocab,
                                       config=config)
                systems[spec] = bench.AigcRt(path, kind.partition("/")[2] or backend, device)
            for batch in batches:
                ids = bench.prompts(batch, prompt_len, c.vocab_size)
                timed = bench.round_robin(systems, ids, new_tokens, repeats, probe)
                reference = min((t for spec, (t, _) in timed.items() if spec in REFERENCES), key=lambda t: t.decode_s)
                for spec, (t, row_bandwidth) in timed.items():
                    kind, dtype = spec.split(":")
                    rows.append(bench.result(name, batch, kind, dtype, t, bench.streamed_bytes(c, dtype, arch),
                                             row_bandwidth, reference, new_tokens))
                    log(_row(rows[-1]))
    return rows, bandwidth


HEADER = ("| shape | batch | system | dtype | tokens/s | ms/step | TTFT ms | vs best torch fp32 | GB/s | read GB/s "
          "| % roofline | same tokens as the reference |\n" + "|---" * 12 + "|")


def _row(r: bench.Result) -> str:
    return (f"| {r.size} | {r.batch} | {r.system} | {r.dtype} | {r.tokens_per_s:.0f} | {r.ms_per_step:.3f} | "
            f"{r.ttft_ms:.1f} | {r.vs_hf_eager:.2f}x | {r.gb_per_s:.1f} | {r.read_gb_per_s:.1f} | "
            f"{r.roofline_pct:.0f}% | {100 * r.same_tokens_as_hf:.0f}% |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--backend", default="auto", help="aigc-rt's backend (auto: cpu on a CPU, triton on a GPU)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    rows, bandwidth = run(a.shapes.split(","), [int(b) for b in a.batches.split(",")], a.repeats, device=a.device,
                          backend=a.backend)
    name, day = bench.device_name(a.device), datetime.date.today()
    slug = "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").lower()
    path = os.path.join(a.out, f"seed_text_{slug}.md")
    software = f"torch {torch.__version__}" + (f", triton {__import__('triton').__version__}" if a.device == "cuda" else
                                               f", {torch.get_num_threads()} threads")
    with open(path, "w") as f:
        f.write(f"# Seed text models (LSTM, Transformer decoder), greedy decode, {name}, {day.isoformat()}\n\n"
                f"{software}, aigc-rt backend {a.backend}, read bandwidth {bandwidth:.1f} GB/s at the start; prompt "
                f"32, 128 new tokens, median of {a.repeats} round-robin runs (bench/bench_seed_text.py: shapes and "
                f"systems).\n\n" + "\n".join([HEADER, *map(_row, rows)]) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
