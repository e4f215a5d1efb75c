"""The runtime weights file: round trip, and every malformed file raises FormatError naming the problem."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import aigc_rt
from aigc_rt import format as fmt
from aigc_rt.config import GPT2Config
from aigc_rt.models.gpt2 import expected_tensors
from conftest import train_tokenizer

TINY = GPT2Config(vocab_size=320, n_positions=16, n_embd=8, n_layer=1, n_head=2)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A small valid gpt2 runtime file written with format.save."""
    torch.manual_seed(0)
    tensors = {k: torch.randn(shape).to(dt) for k, (shape, dt) in expected_tensors(TINY, "fp32").items()}
    path = tmp_path_factory.mktemp("fmt") / "tiny.safetensors"
    fmt.save(path, "gpt2", "fp32", TINY.to_dict(), tensors, train_tokenizer(300).to_str())
    return path


def _rewrite(src, dst, tensors=None, meta=None):
    """Copy a safetensors file, editing its tensors and/or metadata."""
    with safe_open(str(src), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = dict(f.metadata())
    t = tensors(t) if tensors else t
    m = meta(m) if meta else m
    save_file(t, str(dst), metadata=m)
    return dst


def test_round_trip(tiny_file):
    m = aigc_rt.load(tiny_file, backend="torch")
    assert m.config == TINY
    with safe_open(str(tiny_file), "pt") as f:
        assert torch.equal(m.wte, f.get_tensor("wte.weight"))
    assert m.logits(torch.tensor([[1, 2, 3]])).shape == (1, 3, TINY.vocab_size)


def _edit_meta(key, value):
    return lambda m: {**m, key: value} if value is not None else {k: v for k, v in m.items() if k != key}


CASES = {
    "missing tensor": (lambda t: {k: v for k, v in t.items() if k != "h.0.attn.qkv.weight"}, None,
                       "missing tensor(s) h.0.attn.qkv.weight"),
    "extra tensor": (lambda t: {**t, "h.0.attn.bias": torch.zeros(3)}, None, "unexpected tensor(s) h.0.attn.bias"),
    "misshapen tensor": (lambda t: {**t, "ln_f.bias": torch.zeros(9)}, None, "'ln_f.bias' has shape [9], expected [8]"),
    "wrong dtype": (lambda t: {**t, "ln_f.bias": torch.zeros(8, dtype=torch.float16)}, None, "'ln_f.bias' has dtype"),
    "not ours": (None, lambda m: {}, "not an aigc-rt one"),
    "unknown version": (None, _edit_meta("format_version", "99"), "format_version '99' is not supported"),
    "unknown arch": (None, _edit_meta("arch", "llama"), "unknown arch 'llama'"),
    "unknown dtype": (None, _edit_meta("dtype", "fp8"), "unknown dtype 'fp8'"),
    "bad config json": (None, _edit_meta("config", "{n_layer: 1"), "'config' is not valid JSON"),
    "config not object": (None, _edit_meta("config", "[1, 2]"), "must be a JSON object"),
    "config lacks field": (None, lambda m: {**m, "config": json.dumps({**json.loads(m["config"]), "n_head": None})},
                           "'n_head' must be int"),
    "bad config value": (None, lambda m: {**m, "config": json.dumps({**json.loads(m["config"]), "n_head": 3})},
                         "n_embd=8 is not divisible by n_head=3"),
    "no tokenizer": (None, _edit_meta("tokenizer", None), "needs a tokenizer"),
    "bad tokenizer": (None, _edit_meta("tokenizer", "{\"model\": 1}"), "not a valid `tokenizers` JSON"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_file_raises_format_error(case, tiny_file, tmp_path):
    tensors, meta, message = CASES[case]
    bad = _rewrite(tiny_file, tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(aigc_rt.FormatError, match=_re(message)):
        aigc_rt.load(bad, backend="torch")


# a text model's metadata tokenizer, corrupted -> what load() and `aigc-rt info` both say (tensor edit, metadata edit)
_TOKENIZER_JSON = "tokenizer: not a valid `tokenizers` JSON"
BAD_TOKENIZERS = {
    "invalid json": (None, _edit_meta("tokenizer", '{"model": '), _TOKENIZER_JSON),
    "rejected by tokenizers": (None, _edit_meta("tokenizer", '{"model": 1}'), _TOKENIZER_JSON),
    "truncated": (None, lambda m: {**m, "tokenizer": m["tokenizer"][: len(m["tokenizer"]) // 2]}, _TOKENIZER_JSON),
    "missing": (None, _edit_meta("tokenizer", None), "a gpt2 model needs a tokenizer in its metadata"),
    "more tokens than the model": (  # a consistent file whose embedding has fewer rows than the tokenizer has tokens
        lambda t: {**t, "wte.weight": t["wte.weight"][:280].clone()},
        lambda m: {**m, "config": json.dumps({**json.loads(m["config"]), "vocab_size": 280})},
        "the tokenizer has 300 tokens but the model only 280"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENIZERS))
def test_info_rejects_what_load_rejects(case, tiny_file, tmp_path, capsys):
    """`aigc-rt info` makes load()'s checks of the metadata tokenizer: the same FormatError naming the file and
    the tokenizer problem, and exit status 2."""
    import argparse

    from aigc_rt.cli import cmd_info, main
    tensors, meta, message = BAD_TOKENIZERS[case]
    bad = _rewrite(tiny_file, tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(aigc_rt.FormatError, match=_re(f"{bad}: {message}")) as by_load:
        aigc_rt.load(bad, backend="torch")
    with pytest.raises(aigc_rt.FormatError, match=_re(f"{bad}: {message}")) as by_info:
        cmd_info(argparse.Namespace(model=str(bad)))
    assert str(by_info.value) == str(by_load.value)
    assert main(["info", str(bad)]) == 2
    assert f"{bad}: {message}" in capsys.readouterr().err


def test_info_accepts_a_valid_file(tiny_file, capsys):
    from aigc_rt.cli import main
    assert main(["info", str(tiny_file)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "gpt2" and info["config"] == TINY.to_dict()


def _re(s):
    import re
    return re.escape(s)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_int8_file_round_trip_and_scales_required(tmp_path, backend):
    """An int8 file holds int8 matrices with a (rows,) fp32 NAME_scale beside each; the model dequantises them."""
    spec = expected_tensors(TINY, "int8")
    assert spec["wte.weight"] == ((320, 8), torch.int8) and spec["wte.weight_scale"] == ((320,), torch.float32)
    assert spec["h.0.mlp.fc.weight_scale"] == ((32,), torch.float32) and spec["wpe.weight"][1] == torch.float32
    torch.manual_seed(0)
    dense = {k: torch.randn(shape) for k, (shape, dt) in expected_tensors(TINY, "fp32").items()}
    tensors = {k: v for k, v in dense.items()}
    for name in [k for k, (_, dt) in spec.items() if dt == torch.int8]:
        tensors[name], tensors[name + fmt.SCALE_SUFFIX] = fmt.quantize_int8(dense[name])
    tok = train_tokenizer(300).to_str()
    fmt.save(tmp_path / "q.safetensors", "gpt2", "int8", TINY.to_dict(), tensors, tok)
    m = aigc_rt.load(tmp_path / "q.safetensors", backend=backend)
    with torch.inference_mode():
        emb = m.backend.embedding(m.wte, torch.tensor([3]), scale=m.wte_scale)
    assert (emb[0] - dense["wte.weight"][3]).abs().max() <= tensors["wte.weight_scale"][3] / 2 + 1e-6
    asymmetric = {**tensors, "h.0.mlp.fc.weight": tensors["h.0.mlp.fc.weight"].clone()}
    asymmetric["h.0.mlp.fc.weight"][3, 5] = -128  # outside symmetric int8: refused, not computed wrongly
    fmt.save(tmp_path / "asym.safetensors", "gpt2", "int8", TINY.to_dict(), asymmetric, tok)
    with pytest.raises(aigc_rt.FormatError, match=r"'h.0.mlp.fc.weight' holds -128; .* \[-127, 127\]"):
        aigc_rt.load(tmp_path / "asym.safetensors", backend=backend)
    del tensors["h.0.attn.proj.weight_scale"]
    fmt.save(tmp_path / "bad.safetensors", "gpt2", "int8", TINY.to_dict(), tensors, tok)
    with pytest.raises(aigc_rt.FormatError, match="missing tensor.*h.0.attn.proj.weight_scale"):
        aigc_rt.load(tmp_path / "bad.safetensors", backend=backend)


def test_int4_file_round_trip(tmp_path):
    """An int4 file holds each block linear as nibble pairs (out, in / 2) uint8 with (out, ceil(in / 64)) fp32 scales
    and wte in int8 (format.add_embedding); both backends compute what an fp32 file of the dequantised weights
    computes (the torch backend to fp32 rounding; the cpu backend also quantises activations to int8 blocks)."""
    spec = expected_tensors(TINY, "int4")
    assert spec["wte.weight"] == ((320, 8), torch.int8) and spec["wte.weight_scale"] == ((320,), torch.float32)
    assert spec["h.0.mlp.fc.weight"] == ((32, 4), torch.uint8)
    assert spec["h.0.mlp.fc.weight_scale"] == ((32, 1), torch.float32)
    assert spec["h.0.mlp.proj.weight"] == ((8, 16), torch.uint8) and spec["wpe.weight"][1] == torch.float32
    torch.manual_seed(0)
    dense = {k: torch.randn(shape) for k, (shape, dt) in expected_tensors(TINY, "fp32").items()}
    tensors = fmt.to_file_layout(dense, spec, "test")
    tok = train_tokenizer(300).to_str()
    fmt.save(tmp_path / "q.safetensors", "gpt2", "int4", TINY.to_dict(), tensors, tok)
    dequantized = {k: fmt.dequantize_int4(v, tensors[k + "_scale"]) if v.dtype == torch.uint8 else
                   fmt.dequantize_int8(v, tensors[k + "_scale"]) if v.dtype == torch.int8 else v
                   for k, v in tensors.items() if not k.endswith("_scale")}
    fmt.save(tmp_path / "d.safetensors", "gpt2", "fp32", TINY.to_dict(), dequantized, tok)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    want = aigc_rt.load(tmp_path / "d.safetensors", backend="torch").logits(ids)
    for backend, rtol in (("torch", 1e-5), ("cpu", 3e-2)):
        got = aigc_rt.load(tmp_path / "q.safetensors", backend=backend).logits(ids)
        err, tol = (got - want).abs().max().item(), rtol * want.abs().max().item()
        assert err <= tol, f"{backend}: max abs logit error {err:.3g} > {tol:.3g} against the dequantised fp32 file"
    bad = {**tensors, "h.0.attn.qkv.weight_scale": tensors["h.0.attn.qkv.weight_scale"].t().contiguous()}
    fmt.save(tmp_path / "bad.safetensors", "gpt2", "int4", TINY.to_dict(), bad, tok)
    with pytest.raises(aigc_rt.FormatError,
                       match=r"'h.0.attn.qkv.weight_scale' has shape \[1, 24\], expected \[24, 1\]"):
        aigc_rt.load(tmp_path / "bad.safetensors")
    with pytest.raises(aigc_rt.FormatError, match="int4 matrices need an even number of inputs; 'h.0.attn.qkv.weight' "
                                                  "has 9"):
        expected_tensors(GPT2Config(vocab_size=320, n_positions=16, n_embd=9, n_layer=1, n_head=3), "int4")


def test_truncated_file(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    for cut in (0, 4, 8, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(aigc_rt.FormatError, match="not a valid safetensors file"):
            aigc_rt.load(bad, backend="torch")


def test_corrupted_header(tiny_file, tmp_path):
    data = bytearray(tiny_file.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    # (offset, bytes written there, regex for the problem named): a length past the end of the file; a header that
    # is not JSON; control bytes mid-header (inside a JSON string, or splitting a multi-byte UTF-8 character there:
    # the tokenizer's JSON, whose layout varies from run to run, fills most of the header)
    for i, patch, problem in ((0, b"\xff" * 8, "header too large"), (8, b"]", "invalid JSON in header"),
                              (8 + n // 2, b"\x00\x01", "invalid (JSON|UTF-8) in header")):
        bad = tmp_path / "hdr.safetensors"
        edited = bytearray(data)
        edited[i: i + len(patch)] = patch
        bad.write_bytes(bytes(edited))
        with pytest.raises(aigc_rt.FormatError, match=_re(f"{bad}: not a valid safetensors file") + ".*" + problem):
            aigc_rt.load(bad, backend="torch")


def test_directory_and_missing_path(tmp_path):
    with pytest.raises(aigc_rt.FormatError, match="is a directory"):
        aigc_rt.load(tmp_path, backend="torch")
    with pytest.raises(aigc_rt.FormatError, match="no such file"):
        aigc_rt.load(tmp_path / "nope.safetensors", backend="torch")
    assert issubclass(aigc_rt.FormatError, ValueError)


def test_not_safetensors_at_all(tmp_path):
    p = tmp_path / "model.bin"
    torch.save({"x": torch.zeros(3)}, p)
    with pytest.raises(aigc_rt.FormatError, match="not a valid safetensors file"):
        aigc_rt.load(p, backend="torch")


_corruption = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("header"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
                                          min_size=1, max_size=4)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_corruption)
def test_random_corruption_only_raises_format_error(tiny_file, tmp_path, corruption):
    """Truncations, byte flips anywhere and byte flips inside the JSON header: loading either succeeds (a
    flip in tensor data is still a valid file) or raises FormatError, never anything else."""
    data = bytearray(tiny_file.read_bytes())
    kind, arg = corruption
    if kind == "truncate":
        data = data[: int(arg * len(data))]
    else:
        lo, hi = (8, 8 + struct.unpack("<Q", data[:8])[0]) if kind == "header" else (0, len(data))
        for where, xor in arg:
            data[lo + int(where * (hi - lo))] ^= xor
    bad = tmp_path / "fuzz.safetensors"
    bad.write_bytes(bytes(data))
    try:
        aigc_rt.load(bad, backend="torch")
    except aigc_rt.FormatError:
        pass


def _maps(path) -> bool:
    with open("/proc/self/maps") as f:
        return any(str(path) in line for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
@pytest.mark.parametrize("kind", ["gpt2-fp32", "gpt2-int8", "gpt2-int4", "lstm", "tdec", "dcgan-digits",
                                  "dcgan-digits-d", "vae-digits"])
def test_a_loaded_model_does_not_keep_the_file_mapped(kind, hf_odd, tmp_path):
    """The cpu backend repacks every matrix and copies what it keeps as read (biases, norms, embeddings:
    format.owned), so once loaded a model holds no view of the file's memory map, whose pages would otherwise stay
    in the process (RSS twice the model). Each file is a fresh copy, so no other test's model holds its mapping."""
    import gc
    import shutil
    from test_lstm import make_checkpoint as make_lstm
    from test_transformer_decoder import make_checkpoint as make_decoder
    path = tmp_path / "model.safetensors"
    if kind.startswith("gpt2"):
        aigc_rt.convert(hf_odd[0], path, dtype=kind.split("-")[1])
    elif kind == "lstm":
        make_lstm(tmp_path / "src")
        aigc_rt.convert(tmp_path / "src" / "model.pt", path)
    elif kind == "tdec":
        make_decoder(tmp_path / "src", norm_first=True, final_norm=True)
        aigc_rt.convert(tmp_path / "src" / "model.pt", path, config={"n_head": 3, "norm_first": True})
    else:
        shutil.copy(aigc_rt.api.resolve_path(kind), path)
    model = aigc_rt.load(path, backend="cpu")
    gc.collect()
    assert not _maps(path), f"{kind}: the loaded model still holds a view of {path.name}'s memory map"
    del model
