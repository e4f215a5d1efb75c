"""The `aigc-rt` command line. Flags are the Python parameter names with dashes."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

# validation tolerance by weight dtype: max |logit error| <= atol + rtol * max |reference logit|
# (fp32 as DESIGN.md; low precision measured on the test models, with headroom: tests/test_gpt2.py; int4's rounding
# is coarse enough to move random models' logits by up to ~29% of the largest, so its check is a loose one: measure a
# quantised model's quality with `aigc-rt perplexity`)
VALIDATE_TOL = {"fp32": (1e-4, 1e-5), "fp16": (1e-2, 1e-2), "bf16": (5e-2, 5e-2), "int8": (5e-2, 6e-2),
                "int4": (5e-2, 0.35)}
# a quantised text file on another backend vs the torch backend (the reference op set) on the same file: the same
# weights, so what remains is the kernels' own rounding (the cpu kernels quantise activations to int8 blocks:
# measured 0.9-2.2% of max |logit| on the test and embedded models), a check ~10x tighter than int4's against the
# unquantised checkpoint
SAME_WEIGHTS_RTOL = 4e-2
VALIDATE_PROMPTS = ["Hello, my name is", "The quick brown fox", "落霞与孤鹜齐飞", "def main():\n    return"]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, RuntimeError, OSError) as e:  # FormatError is a ValueError
        print(f"aigc-rt {args.command}: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aigc-rt", description="aigc_rt: fast inference for GPT-2, DCGANs, VAEs and "
                                                            "small text models")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a checkpoint to a runtime weights file")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--arch", default=None)
    c.add_argument("--dtype", default="fp32", help="the weight matrices' dtype: fp32 (default), bf16, fp16, int8 "
                                                   "or int4 (int8/int4: weight-only quantisation, see README)")
    c.add_argument("--tokenizer", default=None,
                   help="lstm, transformer_decoder: a tokenizer.json or a JSON list of the characters by id "
                        "(default: tokenizer.json or vocab.json beside SRC)")
    c.add_argument("--n-head", type=int, default=None, help="transformer_decoder: attention heads per layer")
    c.add_argument("--norm-first", action="store_true", help="transformer_decoder: pre-norm layers (norm_first=True)")
    c.add_argument("--image-shape", default=None, metavar="C,H,W",
                   help="vae: the images' channels, height and width (default: from the input width, e.g. 784: "
                        "1,28,28)")
    c.add_argument("--act", default=None, choices=["relu", "tanh"], help="vae: the hidden layers' activation "
                                                                         "(default relu)")
    c.set_defaults(func=cmd_convert)

    g = sub.add_parser("generate", help="generate text")
    g.add_argument("prompt")
    _model_args(g)
    g.add_argument("--max-new-tokens", type=int, default=None, help="new tokens per sequence (default 64)")
    g.add_argument("--max-length", type=int, default=None,
                   help="prompt + new tokens per sequence (Hugging Face's max_length; --max-new-tokens wins)")
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--num-return-sequences", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--eos-token-id", type=int, action="append", default=None, metavar="ID",
                   help="token id that ends a sequence (repeatable: any of them ends it; default: the model "
                        "config's eos_token_id)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--logprobs", action="store_true",
                   help="after each sequence, its log-probability under the model (sum, mean per token, perplexity)")
    g.add_argument("--verbose", action="store_true", help="print time to first token and tokens/s")
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("validate", help="compare a runtime file with its reference checkpoint")
    v.add_argument("model")
    v.add_argument("--reference", required=True,
                   help="the Hugging Face GPT-2 folder (or the state_dict) it was converted from")
    v.add_argument("--backend", default="auto")
    v.add_argument("--atol", type=float, default=None, help="absolute logit tolerance (default: by dtype)")
    v.add_argument("--rtol", type=float, default=None, help="tolerance relative to max |logit| (default: by dtype)")
    v.set_defaults(func=cmd_validate)

    i = sub.add_parser("info", help="describe a runtime weights file")
    i.add_argument("model")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="GPT-2 decode benchmark: HF transformers, pure PyTorch and aigc-rt in one run")
    b.add_argument("--model", default=None, help="benchmark this runtime file alone (default: random-init GPT-2 "
                                                 "at the --sizes shapes, against HF and pure-PyTorch baselines)")
    b.add_argument("--backend", default="cpu", help="aigc-rt backend to measure")
    b.add_argument("--sizes", default="124M", help="comma-separated GPT-2 sizes: 124M, 355M")
    b.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    b.add_argument("--systems", default=None, help="comma-separated system:dtype list (default: all)")
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3, help="timed runs per system; the median is reported")
    b.add_argument("--out", default="bench/results", help="folder for the markdown + JSON results ('' to skip)")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("imagine", help="generate images with a DCGAN generator or a VAE, saved as one grid")
    _model_args(m, "the embedded generator dcgan-digits")
    m.add_argument("-n", type=int, default=16, help="number of images")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("-o", "--output", default="grid.png")
    m.add_argument("--nrow", type=int, default=8, help="images per grid row")
    m.set_defaults(func=cmd_imagine)

    s = sub.add_parser("score", help="probability that each image is real, by a DCGAN discriminator")
    s.add_argument("images", nargs="+", help="image files of the discriminator's size")
    _model_args(s, "the embedded discriminator dcgan-digits-d")
    s.set_defaults(func=cmd_score)

    e = sub.add_parser("elbo", help="each image's evidence lower bound (nats) under a VAE, a bound on log p(x)")
    e.add_argument("images", nargs="+", help="image files of the VAE's size")
    e.add_argument("--model", required=True, help="a VAE runtime file")
    e.add_argument("--device", default="cpu")
    e.add_argument("--backend", default="auto")
    e.add_argument("--samples", type=int, default=1, help="draws of z per image for the expectation")
    e.add_argument("--iwae", type=int, default=0, metavar="K",
                   help="also the importance-weighted estimate of log p(x) from K draws (tighter than the ELBO)")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_elbo)

    pp = sub.add_parser("perplexity", help="how well a text model predicts text files (NLL per token, perplexity)")
    pp.add_argument("files", nargs="+", help="UTF-8 text files, each scored on its own")
    _model_args(pp)
    pp.add_argument("--window", type=int, default=None, help="input tokens per window (default: the context length)")
    pp.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: the window; smaller: more context per token)")
    pp.set_defaults(func=cmd_perplexity)

    d = sub.add_parser("demo", help="the main job: generate text and digits (GAN and VAE) with the default models")
    _model_args(d)
    d.add_argument("--image-output", default=os.path.join("out", "digits.png"))
    d.set_defaults(func=cmd_demo)
    return p


def _model_args(p, default="the embedded text model"):
    p.add_argument("--model", default=None, help=f"runtime file or embedded model name (default: {default})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")


def _sampling_kwargs(a) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, max_length=a.max_length, do_sample=a.do_sample, temperature=a.temperature, top_k=a.top_k,
                top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                num_return_sequences=a.num_return_sequences, seed=a.seed, stop=a.stop,
                eos_token_id=a.eos_token_id, logprobs=a.logprobs)


def cmd_convert(a):
    import aigc_rt
    config = {**({"n_head": a.n_head} if a.n_head is not None else {}), **({"norm_first": True} if a.norm_first else {})}
    if a.image_shape is not None:
        try:
            config.update(zip(("channels", "height", "width"), map(int, a.image_shape.split(",")), strict=True))
        except ValueError:
            raise ValueError(f"--image-shape must be C,H,W (three integers), got {a.image_shape!r}") from None
    if a.act is not None:
        config["act"] = a.act
    dst = aigc_rt.convert(a.src, a.dst, arch=a.arch, dtype=a.dtype, tokenizer=a.tokenizer, config=config or None)
    print(f"wrote {dst} ({os.path.getsize(dst) / 1e6:.1f} MB)")


def cmd_generate(a):
    import aigc_rt
    from aigc_rt.generation import run
    m = aigc_rt.load(a.model, device=a.device, backend=a.backend)
    kwargs = _sampling_kwargs(a)
    if a.stream and a.num_return_sequences != 1:
        raise ValueError("--stream prints one sequence; use --num-return-sequences 1")
    t0 = time.perf_counter()
    events = run(m, a.prompt, **kwargs)  # validates every argument before anything is printed
    if a.stream:
        print(a.prompt, end="", flush=True)
    first, n_tokens, done = None, 0, {}
    for ev in events:
        first = first or time.perf_counter()
        n_tokens += 1
        if a.stream:
            print(ev.piece, end="", flush=True)
        if ev.finished:
            done[ev.row] = ev.finished
    t1 = time.perf_counter()
    if a.stream:
        print()
        if a.logprobs:
            print(_logprob_line(done[0].logprobs))
    else:
        for i in range(len(done)):
            if len(done) > 1:
                print(f"--- sequence {i} ({done[i].finish_reason})")
            print(a.prompt + done[i].text)
            if a.logprobs:
                print(_logprob_line(done[i].logprobs))
    if a.verbose:
        rate = (n_tokens - len(done)) / (t1 - first) if t1 > first else float("nan")
        print(f"[{n_tokens} tokens, time to first token {1e3 * (first - t0):.1f} ms, decode {rate:.1f} tokens/s, "
              f"backend {m.backend.name}]", file=sys.stderr)


def _logprob_line(logprobs: list[float]) -> str:
    total = sum(logprobs)
    return (f"[log p(new tokens | prompt) = {total:.4f} nats over {len(logprobs)} tokens, "
            f"{total / len(logprobs):.4f} a token, perplexity {math.exp(-total / len(logprobs)):.3f}]")


def cmd_validate(a):
    import aigc_rt
    m = aigc_rt.load(a.model, backend=a.backend)
    if m.arch in ("dcgan", "dcgan_d"):
        return _validate_dcgan(m, a)
    if m.arch == "vae":
        return _validate_vae(m, a)
    ref_logits, ref_greedy = _text_reference(m, a.reference)
    atol, rtol = VALIDATE_TOL[m.dtype]
    atol, rtol = atol if a.atol is None else a.atol, rtol if a.rtol is None else a.rtol
    ok, worst = True, 0.0
    quantised = m.dtype in ("int8", "int4") and m.backend.name != "torch"
    same_weights = aigc_rt.load(a.model, backend="torch") if quantised else None
    for prompt in _validation_prompts(m):
        ids = m.tokenizer.encode(prompt)[: m.config.n_positions // 2]
        with torch.no_grad():
            want = ref_logits(ids)
        logits = m.logits(torch.tensor([ids]))[0]
        err = (logits - want).abs().max().item()
        tol = atol + rtol * want.abs().max().item()
        n_new = min(16, m.config.n_positions - len(ids))
        got = m.generate(ids, max_new_tokens=n_new, eos_token_id=[])[0].token_ids
        with torch.no_grad():
            exp = ref_greedy(ids, n_new)
        same = got == exp
        worst = max(worst, err / tol)
        ok &= err <= tol and (same or m.dtype != "fp32")  # low precision may legitimately flip a near-tie
        print(f"{prompt[:24]!r:28} max|logit err| {err:.3g} (tol {tol:.3g})  "
              f"greedy {n_new} tokens {'identical' if same else 'DIFFER'}")
        if same_weights is not None:
            want = same_weights.logits(torch.tensor([ids]))[0]
            err, tol = (logits - want).abs().max().item(), SAME_WEIGHTS_RTOL * want.abs().max().item()
            worst = max(worst, err / tol)
            ok &= err <= tol
            print(f"{'':28} vs the torch backend on the same weights: max|logit err| {err:.3g} (tol {tol:.3g})")
    also = f", same weights rtol {SAME_WEIGHTS_RTOL:g}" if same_weights is not None else ""
    print(f"{'PASS' if ok else 'FAIL'}: worst logit error {worst:.2f}x its tolerance (dtype {m.dtype}, "
          f"backend {m.backend.name}, atol {atol:g}, rtol {rtol:g}{also})")
    return 0 if ok else 1


def _text_reference(m, src: str):
    """The reference of a text model's checkpoint: (logits(ids) -> (T, V), greedy(ids, n) -> n new ids)."""
    if m.arch == "transformer_decoder":
        from aigc_rt.convert.transformer_decoder import reference_module
        decoder = reference_module(src, m.config.to_dict())

        def full(ids):  # (T, V): the reference recomputes the whole sequence (it keeps no cache)
            return decoder(torch.tensor(ids)[:, None])[:, 0]

        def greedy(ids, n):
            ids = list(ids)
            for _ in range(n):
                ids.append(int(full(ids)[-1].argmax()))
            return ids[len(ids) - n:]
        return full, greedy
    if m.arch == "lstm":
        from aigc_rt.convert.lstm import reference_module
        lstm = reference_module(src)

        def greedy(ids, n):  # the reference's own recurrent state, carried token by token
            logits, state = lstm(torch.tensor(ids)[:, None])
            out = []
            for _ in range(n):
                out.append(int(logits[-1, 0].argmax()))
                logits, state = lstm(torch.tensor([[out[-1]]]), state)
            return out
        return (lambda ids: lstm(torch.tensor(ids)[:, None])[0][:, 0]), greedy
    from transformers import GPT2LMHeadModel
    ref = GPT2LMHeadModel.from_pretrained(src, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # compare full-length greedy continuations
    return (lambda ids: ref(torch.tensor([ids])).logits[0]), \
        lambda ids, n: ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                    pad_token_id=0)[0, len(ids):].tolist()


def _validation_prompts(m) -> list[str]:
    """VALIDATE_PROMPTS; a character vocabulary cannot spell them all: then its own characters, in runs."""
    try:
        for prompt in VALIDATE_PROMPTS:
            m.tokenizer.encode(prompt)
        return VALIDATE_PROMPTS
    except ValueError:
        alphabet = m.tokenizer.decode(list(range(m.config.vocab_size)))
        text = alphabet * (40 // max(len(alphabet), 1) + 1)
        return [text[i: i + 12] for i in (0, 5, 11)]


def _validate_dcgan(m, a):
    """A DCGAN file vs the eval-mode torch module of its checkpoint (BatchNorm unfolded), on 8 inputs."""
    from aigc_rt.convert.dcgan import reference_module
    ref = reference_module(a.reference)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if m.arch == "dcgan":
            x = torch.randn(8, m.nz, generator=g)  # (8, nz)
            got, want = m(x), ref(x[:, :, None, None])
        else:
            c = m.config
            x = torch.rand(8, c.channels, c.image_size, c.image_size, generator=g) * 2 - 1
            got, want = m.score(x), ref(x).reshape(-1)
    if got.shape != want.shape:
        raise ValueError(f"{a.reference} makes outputs of shape {tuple(want.shape)}, {a.model} {tuple(got.shape)}")
    atol, rtol = VALIDATE_TOL[m.dtype]
    atol, rtol = atol if a.atol is None else a.atol, rtol if a.rtol is None else a.rtol
    err, tol = (got - want).abs().max().item(), atol + rtol * want.abs().max().item()
    ok = err <= tol
    print(f"{'PASS' if ok else 'FAIL'}: max |output error| {err:.3g} (tol {tol:.3g}) over 8 "
          f"{'latents' if m.arch == 'dcgan' else 'images'} (backend {m.backend.name})")
    return 0 if ok else 1


def _validate_vae(m, a):
    """A VAE file vs examples/vae's encode / decode on the checkpoint (convert/vae.py reference_module): mu, logvar
    of 8 random images, the decoder's means of 8 latents, and the ELBO of those images against examples/vae's
    loss_function on the same draws of eps (-ELBO = BCE(sum) + KLD)."""
    from aigc_rt.convert.vae import reference_module
    c = m.config
    ref = reference_module(a.reference, {k: getattr(c, k) for k in ("channels", "height", "width", "act")})
    g = torch.Generator().manual_seed(0)
    x, z = torch.rand(8, c.pixels, generator=g), torch.randn(8, c.latent, generator=g)
    eps = torch.randn(1, 8, c.latent, generator=torch.Generator().manual_seed(1))  # what elbo(seed=1) draws
    with torch.no_grad():
        mu, logvar = ref.encode(x)
        checks = [("mu", m.encode(x)[0], mu), ("logvar", m.encode(x)[1], logvar),
                  ("decoded means", m.decode(z).reshape(8, -1), ref.decode(z))]
        # the ELBO in float64: in float32 log(1 - sigmoid(l)) loses digits where sigmoid(l) nears 1
        ref, x, eps = ref.double(), x.double(), eps.double()
        mu, logvar = ref.encode(x)
        recon = ref.decode(mu + eps[0] * torch.exp(0.5 * logvar))
        bce = torch.nn.functional.binary_cross_entropy(recon, x, reduction="none").sum(1)
        neg_elbo = bce - 0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(1)
        checks.append(("ELBO", m.elbo(x.float(), seed=1), -neg_elbo.float()))
    atol, rtol = VALIDATE_TOL[m.dtype]
    atol, rtol = atol if a.atol is None else a.atol, rtol if a.rtol is None else a.rtol
    ok = True
    for name, got, want in checks:
        err, tol = (got - want).abs().max().item(), atol + rtol * want.abs().max().item()
        ok &= err <= tol
        print(f"{name:14} max |error| {err:.3g} (tol {tol:.3g})")
    print(f"{'PASS' if ok else 'FAIL'}: 8 images and 8 latents (dtype {m.dtype}, backend {m.backend.name})")
    return 0 if ok else 1


def cmd_info(a):
    from aigc_rt import format as fmt
    from aigc_rt.api import read_checked
    rf = read_checked(a.model)[0]  # every check load() makes (tensors, config, a text model's tokenizer)
    scales = [n for n in rf.tensors if n.endswith(fmt.SCALE_SUFFIX)]
    n_params = sum(t.numel() * (2 if t.dtype == torch.uint8 else 1)  # int4 matrices: two weights a byte
                   for n, t in rf.tensors.items() if n not in scales)
    info = {"path": rf.path, "arch": rf.arch, "dtype": rf.dtype, "config": rf.config, "parameters": n_params,
            "file_bytes": os.path.getsize(rf.path)}
    if scales:
        scheme = {"int8": "int8 weight-only, symmetric, one fp32 scale per output channel",
                  "int4": "int4 weight-only, symmetric, one fp32 scale per output channel and group of 64 inputs "
                          "(embedding tables int8, one scale per row)"}[rf.dtype]
        info["quantization"] = {"scheme": scheme, "quantized_matrices": len(scales)}
    print(json.dumps(info, indent=2))


def cmd_bench(a):
    from aigc_rt import bench
    batches = [int(b) for b in a.batches.split(",")]
    if a.model:
        import aigc_rt
        from aigc_rt import bench_images
        m = aigc_rt.load(a.model, backend=a.backend)
        if m.arch in ("dcgan", "dcgan_d", "vae"):  # image models: images/s, no decode loop
            print(bench_images.table(bench_images.run_image_file(m, os.path.basename(str(a.model)), batches,
                                                                 log=lambda row: None)))
            return
        del m
        results, bandwidth = bench.run_file(a.model, a.backend, batches, a.new_tokens, a.prompt_len, a.repeats)
    else:
        sizes = a.sizes.split(",")
        systems = a.systems.split(",") if a.systems else bench.SYSTEMS
        for s in sizes:
            if s not in bench.SIZES:
                raise ValueError(f"unknown size {s!r}; choose from {sorted(bench.SIZES)}")
        for s in systems:
            if s not in bench.SYSTEMS:
                raise ValueError(f"unknown system {s!r}; choose from {', '.join(bench.SYSTEMS)}")
        results, bandwidth = bench.run(sizes, batches, systems, a.backend, a.new_tokens, a.prompt_len, a.repeats)
    print(bench.table(results))
    if a.out:
        note = (f"prompt {a.prompt_len} tokens, {a.new_tokens} new tokens, greedy, median of {a.repeats} runs "
                f"(after a warm-up).")
        for path in bench.save(results, bandwidth, a.out, note):
            print(f"wrote {path}")


def _load_arch(path, archs: tuple[str, ...], a):
    import aigc_rt
    m = aigc_rt.load(path, device=a.device, backend=a.backend)
    if m.arch not in archs:
        raise ValueError(f"{path}: a {m.arch} model, where this command needs a {' or '.join(archs)} one")
    return m


def _imagine(g, n: int, seed: int, output: str, nrow: int) -> tuple[str, torch.Tensor]:
    """-> (what was written, the images (n, C, S, S))."""
    from aigc_rt.images import check_writable, save_grid
    check_writable(output)
    t0 = time.perf_counter()
    images = g.generate(n, seed=seed)  # (n, C, S, S)
    dt = time.perf_counter() - t0
    save_grid(images, output, nrow=nrow)
    return (f"wrote {output}: {n} images of {images.shape[-1]}x{images.shape[-2]} in {dt * 1e3:.0f} ms "
            f"({n / dt:.0f} images/s, backend {g.backend.name})"), images


def cmd_imagine(a):
    from aigc_rt.api import DEFAULT_IMAGE_MODEL
    print(_imagine(_load_arch(a.model or DEFAULT_IMAGE_MODEL, ("dcgan", "vae"), a), a.n, a.seed, a.output,
                   a.nrow)[0])


def cmd_score(a):
    from aigc_rt.api import DEFAULT_IMAGE_MODEL
    d = _load_arch(a.model or DEFAULT_IMAGE_MODEL + "-d", ("dcgan_d",), a)
    c = d.config
    images = _read_images(a.images, c.channels, c.image_size, c.image_size, "the discriminator")
    for path, p in zip(a.images, d.score(images * 2 - 1).tolist()):  # the discriminator takes [-1, 1]
        print(f"{p:.4f}\t{path}")


def cmd_elbo(a):
    if a.iwae < 0:
        raise ValueError(f"--iwae must be >= 0 (0: off), got {a.iwae}")
    v = _load_arch(a.model, ("vae",), a)
    c = v.config
    images = _read_images(a.images, c.channels, c.height, c.width, "the VAE")
    elbo = v.elbo(images, samples=a.samples, seed=a.seed).tolist()
    iwae = v.log_likelihood(images, samples=a.iwae, seed=a.seed).tolist() if a.iwae else [None] * len(elbo)
    for path, nats, ll in zip(a.images, elbo, iwae):  # bits per dimension: -ELBO / (D ln 2), an upper bound
        extra = "" if ll is None else f"\tlog p(x) ~ {ll:.3f} nats (IWAE, {a.iwae} samples)"
        print(f"{nats:.3f} nats\t{-nats / (c.pixels * math.log(2)):.4f} bits/dim{extra}\t{path}")


def cmd_perplexity(a):
    import aigc_rt
    from aigc_rt.models.text import Perplexity, TextModel
    m = aigc_rt.load(a.model, device=a.device, backend=a.backend)
    if not isinstance(m, TextModel):
        raise ValueError(f"{a.model}: a {m.arch} model, where perplexity needs a text model")
    total = Perplexity(0, 0.0)
    for path in a.files:
        with open(path, encoding="utf-8") as f:
            p = m.perplexity(f.read(), window=a.window, stride=a.stride)
        total = Perplexity(total.tokens + p.tokens, total.nll + p.nll)
        print(f"{p.tokens} tokens\t{p.nats_per_token:.4f} nats/token\tperplexity {p.perplexity:.3f}\t{path}")
    if len(a.files) > 1:
        print(f"{total.tokens} tokens\t{total.nats_per_token:.4f} nats/token\tperplexity {total.perplexity:.3f}\tall")


def _read_images(paths: list[str], channels: int, height: int, width: int, what: str) -> torch.Tensor:
    """Image files -> float32 (N, channels, height, width) in [0, 1] (byte / 255, as torchvision's ToTensor)."""
    import numpy as np
    from PIL import Image
    images = []
    for path in paths:
        with Image.open(path) as im:  # OSError naming the path if missing or not an image
            if im.size != (width, height):
                raise ValueError(f"{path}: {im.size[0]}x{im.size[1]} pixels; {what} takes {width}x{height}")
            pixels = np.asarray(im.convert("RGB" if channels == 3 else "L"), dtype=np.float32)
        images.append(torch.from_numpy(pixels).reshape(height, width, -1).permute(2, 0, 1) / 255)  # (C, H, W)
    return torch.stack(images)


def cmd_demo(a):
    import aigc_rt
    from aigc_rt.api import DEFAULT_IMAGE_MODEL, DEFAULT_VAE
    m = aigc_rt.load(a.model, device=a.device, backend=a.backend)
    for prompt in ["The", "In Python, a list"]:
        t0 = time.perf_counter()
        out = m.generate(prompt, max_new_tokens=48, do_sample=True, top_k=50, temperature=0.7, seed=0,
                         repetition_penalty=1.15)[0]  # a 4-layer model repeats itself without the penalty
        dt = time.perf_counter() - t0
        print(f"{prompt}{out.text}\n  [{len(out.token_ids)} tokens in {dt * 1e3:.0f} ms, "
              f"{len(out.token_ids) / dt:.0f} tokens/s, backend {m.backend.name}]\n")
    os.makedirs(os.path.dirname(os.path.abspath(a.image_output)), exist_ok=True)
    text, images = _imagine(_load_arch(DEFAULT_IMAGE_MODEL, ("dcgan",), a), 64, 0, a.image_output, 8)
    print(text)
    d = _load_arch(DEFAULT_IMAGE_MODEL + "-d", ("dcgan_d",), a)  # its discriminator, the other player of the GAN
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t0 = time.perf_counter()
    fake = d.score(images)  # (64,) D(G(z)): the probability that each generated digit is real
    dt = time.perf_counter() - t0
    log_1m_d = torch.nn.functional.logsigmoid(-d.logits(images)).mean()  # exact even where D(G(z)) rounds to 1
    print(f"scored by {DEFAULT_IMAGE_MODEL}-d: mean D(G(z)) {fake.mean():.3f}, uniform noise "
          f"{d.score(noise).mean():.3f}; E[log(1 - D(G(z)))] {log_1m_d:.3f} "
          f"({len(fake) / dt:.0f} images/s, backend {d.backend.name})")
    vae_output = os.path.join(os.path.dirname(a.image_output), "vae-digits.png")
    v = _load_arch(DEFAULT_VAE, ("vae",), a)
    text, images = _imagine(v, 64, 0, vae_output, 8)
    digits = (images[:8] + 1) / 2  # in [0, 1], as the VAE's likelihood takes them
    noise = torch.rand(digits.shape, generator=torch.Generator().manual_seed(0))
    own, uniform = (v.elbo(x, samples=8, seed=0).mean().item() for x in (digits, noise))
    print(f"{text}\nELBO under {DEFAULT_VAE} (a lower bound of log p(x), nats per image): its own samples {own:.1f}, "
          f"uniform noise {uniform:.1f}")


if __name__ == "__main__":
    sys.exit(main())
