"""Shared fixtures: tiny random-init Hugging Face GPT-2 checkpoints (with a byte-level BPE tokenizer
trained on the fly) standing in for real ones, and their converted runtime files; the seed DCGAN, converted."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("AIGC_RT_GPU") else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import aigc_rt  # noqa: E402

CORPUS = [
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
    "Complex is better than complicated. Flat is better than nested. Sparse is better than dense. "
    "Readability counts. Errors should never pass silently, unless explicitly silenced.",
    "落霞与孤鹜齐飞，秋水共长天一色。", "Hello world! 🙂 The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42\n", "Once upon a time there was a tiny model that generated text.",
]

# name -> HF GPT2Config kwargs. Odd sizes on purpose; "hd64" has head_dim 64.
CONFIGS = {
    "odd": dict(n_layer=3, n_embd=96, n_head=3, vocab_size=1000, n_positions=64),
    "hd64": dict(n_layer=2, n_embd=128, n_head=2, vocab_size=1003, n_positions=80),
}


def train_tokenizer(vocab_size: int = 600):
    from tokenizers import ByteLevelBPETokenizer
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return tok


def make_hf_gpt2(path, name: str = "odd", safetensors: bool = True, seed: int = 0):
    """Save a random-init GPT2LMHeadModel (+ tokenizer) as a HF folder; return the model (eval, fp32)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    # a wider init than GPT-2's 0.02 so that random models produce varied, non-degenerate continuations
    cfg = GPT2Config(**CONFIGS[name], bos_token_id=0, eos_token_id=0, layer_norm_epsilon=1e-5,
                     initializer_range=0.1)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters and biases
        for n, p in model.named_parameters():
            if n.endswith("bias") or ".ln_" in n or "ln_f" in n:
                p.add_(torch.randn_like(p) * 0.1)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=safetensors)
    tok = train_tokenizer()
    if safetensors:
        tok.save(os.path.join(path, "tokenizer.json"))
    else:
        tok.save_model(str(path))  # vocab.json + merges.txt
    return model


@pytest.fixture(scope="session")
def hf_odd(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_odd")
    return path, make_hf_gpt2(path, "odd")


@pytest.fixture(scope="session")
def rt_odd(hf_odd, tmp_path_factory):
    """(runtime file path, HF model) for the 'odd' config, fp32."""
    path = tmp_path_factory.mktemp("rt") / "odd.safetensors"
    aigc_rt.convert(hf_odd[0], path)
    return path, hf_odd[1]


# -- C++ kernels: run a test once per instruction set (csrc/cpu/vec.h) --------------------------------------
ISAS = ["avx512", "avx2", "scalar"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Make the C++ kernels use this ISA for the test (skipped where the CPU lacks it); restores the default."""
    from aigc_rt import _C
    try:
        previous = _C.set_simd_isa(request.param)
    except ValueError as e:
        if "does not support" not in str(e):  # csrc/cpu/vec.cpp; anything else (a renamed ISA) must fail
            raise
        pytest.skip(f"this CPU lacks {request.param}: {e}")
    yield request.param
    _C.set_simd_isa(previous)


def use_gpu_settings(setattr_=setattr, *more: tuple) -> None:
    """Make the Triton launchers take a GPU's block sizes (kernels/utils.py *_settings(interpreter=False)), through
    setattr_ (monkeypatch.setattr in a test); more: further (module, name) pairs (tools/interpret_gpt2_shapes.py
    adds the fused MLP's)."""
    import functools

    from aigc_rt.kernels import attention, decode_attention, linear, sampling, utils
    for module, name in ((attention, "attention_settings"), (decode_attention, "decode_settings"),
                         (linear, "linear_settings"), (linear, "gemv_settings"), (sampling, "sampling_settings"),
                         *more):
        setattr_(module, name, functools.partial(getattr(utils, name), interpreter=False))


@pytest.fixture
def gpu_settings(monkeypatch):
    """The Triton launchers take a GPU's block sizes: the interpreter then runs the tiles, splits and chunks a GPU
    runs, which its own small settings never reach."""
    use_gpu_settings(monkeypatch.setattr)


@pytest.fixture(scope="session")
def seed_gan(tmp_path_factory):
    """The 32x32 seed DCGAN (tools/dcgan_reference.py) with non-trivial BatchNorm statistics, converted:
    (G module, G file, D module, D file); tests/test_dcgan.py, tests/test_triton_conv2d.py."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    from dcgan_reference import randomize_batchnorm, seed_discriminator, seed_generator
    folder = tmp_path_factory.mktemp("seed_gan")
    torch.manual_seed(5)
    g, d = randomize_batchnorm(seed_generator(), 1), randomize_batchnorm(seed_discriminator(), 2)
    torch.save(g.state_dict(), folder / "g.pt")
    torch.save(d.state_dict(), folder / "d.pt")
    return g, aigc_rt.convert(folder / "g.pt", folder / "g.safetensors"), d, \
        aigc_rt.convert(folder / "d.pt", folder / "d.safetensors")
