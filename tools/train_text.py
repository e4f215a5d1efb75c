"""Train the embedded default text model: a small GPT-2 on English documentation that is on every machine.

Corpus: the pydoc topics (pydoc_data) and the docstrings (>= 100 characters) of the modules, classes and
functions of CPython's standard library and of numpy, scipy and scikit-learn (installed with aigc_rt and its
tests), deduplicated, in a fixed order. A document is held out for validation when crc32(text) % 20 == 0, so
the split does not move when a package version adds or drops documents. Tokenizer: byte-level BPE (8,192
tokens, `tokenizers`). Model: transformers GPT2LMHeadModel, 4 layers, 256 wide, 4 heads, context 512,
trained with AdamW under bf16 autocast where the CPU has bf16 matrix instructions (AMX / AVX-512 BF16: about
2.3x the fp32 step rate). Saves a Hugging Face folder, converts it with aigc_rt's own converter to
aigc_rt/data/gpt2-tiny.safetensors (fp32), and prints validation perplexity next to a unigram baseline.

    python tools/train_text.py --out build/train_text [--max-minutes 28]
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sysconfig
import time
import zlib

import torch

EOT = "<|endoftext|>"
VOCAB, N_LAYER, N_EMBD, N_HEAD, N_CTX = 8192, 4, 256, 4, 512


PACKAGES = ("numpy", "scipy", "sklearn")  # documentation-rich packages installed beside aigc_rt


def documents() -> list[str]:
    """English documentation text, deduplicated, in a fixed order."""
    import importlib.util

    import pydoc_data.topics
    docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    roots = [sysconfig.get_paths()["stdlib"]]
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"train_text: package {name} is not installed (pip install -r requirements-dev.txt)")
        roots.append(list(spec.submodule_search_locations)[0])
    for root in roots:
        docs.extend(_docstrings(root))
    return list(dict.fromkeys(docs))


def _docstrings(root: str, min_chars: int = 100):
    for path, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "idle_test", "site-packages", "__pycache__"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        yield doc


def split(docs: list[str]) -> tuple[list[str], list[str]]:
    """-> (train, validation): a document is held out when crc32(text) % 20 == 0."""
    held_out = [zlib.crc32(d.encode()) % 20 == 0 for d in docs]
    return [d for d, h in zip(docs, held_out) if not h], [d for d, h in zip(docs, held_out) if h]


def train_tokenizer(train_docs):
    from tokenizers import ByteLevelBPETokenizer
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(train_docs, vocab_size=VOCAB, min_frequency=2, special_tokens=[EOT], show_progress=False)
    return tok


def encode(tok, docs) -> torch.Tensor:
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def unigram_perplexity(train_ids: torch.Tensor, val_ids: torch.Tensor) -> float:
    """Add-one smoothed unigram model fitted on the training tokens."""
    counts = torch.bincount(train_ids, minlength=VOCAB).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[val_ids].mean().item())


@torch.no_grad()
def perplexity(model, val_ids: torch.Tensor, ctx: int = N_CTX) -> float:
    """Non-overlapping windows of `ctx` tokens."""
    model.eval()
    nll, n = 0.0, 0
    for i in range(0, len(val_ids) - 1, ctx):
        x = val_ids[i: i + ctx + 1]
        if len(x) < 2:
            break
        logits = model(x[None, :-1]).logits[0]
        nll += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
        n += len(x) - 1
    model.train()
    return math.exp(nll / n)


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="build/train_text")
    ap.add_argument("--dst", default=os.path.join(os.path.dirname(__file__), "..", "aigc_rt", "data",
                                                  "gpt2-tiny.safetensors"))
    ap.add_argument("--max-minutes", type=float, default=28.0)
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="bf16 autocast for the forward pass (auto: where the CPU has AMX or AVX-512 BF16)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    t_start = time.time()

    from transformers import GPT2Config, GPT2LMHeadModel
    train_docs, val_docs = split(documents())
    tok = train_tokenizer(train_docs)
    train_ids, val_ids = encode(tok, train_docs), encode(tok, val_docs)
    print(f"corpus: {len(train_docs)} train / {len(val_docs)} validation documents, "
          f"{len(train_ids)} / {len(val_ids)} tokens", flush=True)

    eot = tok.token_to_id(EOT)
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and _cpu_has_bf16())
    print(f"bf16 autocast: {bf16}", flush=True)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=N_CTX, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
                     bos_token_id=eot, eos_token_id=eot, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 100
    g = torch.Generator().manual_seed(0)
    step, budget = 0, args.max_minutes * 60
    t0 = time.time()
    while step < args.max_steps and time.time() - t_start < budget:
        # cosine schedule over whichever budget (steps or minutes) runs out first, with a linear warm-up
        progress = max(step / args.max_steps, (time.time() - t_start) / budget)
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - N_CTX - 1, (args.batch,), generator=g)
        x = torch.stack([train_ids[s: s + N_CTX + 1] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            el = time.time() - t0
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {step * args.batch * N_CTX / el:.0f} tok/s "
                  f"{el / 60:.1f} min", flush=True)
    train_minutes = (time.time() - t_start) / 60
    ppl, uni = perplexity(model, val_ids), unigram_perplexity(train_ids, val_ids)
    print(f"trained {step} steps in {train_minutes:.1f} min; validation perplexity {ppl:.2f}, "
          f"unigram baseline {uni:.2f}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    import aigc_rt
    dst = aigc_rt.convert(args.out, args.dst, dtype="fp32")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"steps": step, "train_minutes": round(train_minutes, 1), "val_perplexity": round(ppl, 2),
                   "unigram_perplexity": round(uni, 2), "train_tokens": len(train_ids), "val_tokens": len(val_ids),
                   "batch": args.batch, "context": N_CTX, "bf16_autocast": bf16}, f, indent=2)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
