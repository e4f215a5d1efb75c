"""The seed LSTM text generator (Embedding -> LSTM -> Linear, sequence-first): converter, model on every backend,
generation, the C++ LSTM cell, the character vocabulary, bad checkpoints. References: torch.nn's modules
(logits; greedy continuations with the reference's own recurrent state) and TorchBackend.lstm_cell."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import aigc_rt
from aigc_rt import FormatError
from aigc_rt.backends.torch_backend import TorchBackend

from test_triton_kernels import DEV

CHARS = list("abcdefghijklmnopqrstuvwxyz .,!?\n") + list("落霞与孤鹜齐飞秋水共长天一色")  # 46 characters
BACKENDS = ["torch", "cpu", "triton"]  # triton: the interpreter on a CPU (conftest), real kernels on a GPU (DEV)
ATOL = 2e-5  # fp32 logits vs torch.nn: same math, other summation orders and exp/tanh approximations


class CharLSTM(nn.Module):
    """The seed system as a user writes it (their own module names)."""

    def __init__(self, vocab: int, emb: int, hidden: int, layers: int, bias: bool = True, **lstm_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, layers, bias=bias, **lstm_kwargs)
        self.out = nn.Linear(hidden * (2 if lstm_kwargs.get("bidirectional") else 1), vocab)

    def forward(self, ids, state=None):  # ids (T, B) -> logits (T, B, V)
        y, state = self.rnn(self.embed(ids), state)
        return self.out(y), state


def make_checkpoint(folder, seed: int = 0, bias: bool = True, **lstm_kwargs) -> CharLSTM:
    """A random-init CharLSTM at odd sizes (46 characters, 13 -> 23 x 3), saved as model.pt with vocab.json beside."""
    torch.manual_seed(seed)
    model = CharLSTM(len(CHARS), 13, 23, 3, bias=bias, **lstm_kwargs).eval()
    with torch.no_grad():  # a wider init than torch's, so that continuations vary
        for p in model.parameters():
            p.mul_(3.0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "vocab.json").write_text(json.dumps(CHARS, ensure_ascii=False), encoding="utf-8")
    return model


@pytest.fixture(scope="module")
def seed_lstm(tmp_path_factory):
    """(runtime file, the torch module) of the fp32 conversion."""
    folder = tmp_path_factory.mktemp("lstm")
    model = make_checkpoint(folder)
    return aigc_rt.convert(folder / "model.pt", folder / "model.safetensors"), model


def reference_greedy(model: CharLSTM, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, the module carrying its own (h, c) from token to token."""
    with torch.no_grad():
        logits, state = model(torch.tensor(ids)[:, None])
        out = []
        for _ in range(n):
            out.append(int(logits[-1, 0].argmax()))
            logits, state = model(torch.tensor([[out[-1]]]), state)
    return out


def load_on(path, backend: str):
    """The file on `backend`: the triton one on DEV (a GPU when there is one), the others on the CPU."""
    return aigc_rt.load(path, device=DEV if backend == "triton" else "cpu", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_the_torch_module(seed_lstm, backend):
    path, ref = seed_lstm
    m = load_on(path, backend)
    ids = torch.randint(0, len(CHARS), (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids.t())[0].transpose(0, 1)  # (B, T, V)
    got = m.logits(ids).cpu()
    err = (got - want).abs().max().item()
    assert got.shape == want.shape and err <= ATOL, f"{backend}: max |logit error| {err:.3g} > {ATOL}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_batch_matches_the_reference(seed_lstm, backend):
    """A ragged batch (right-padded prefill: each row's state is taken after its own last token) gives each
    prompt the continuation the torch module gives it alone."""
    path, ref = seed_lstm
    m = load_on(path, backend)
    prompts = ["落霞与孤鹜齐飞", "hello, world", "a"]
    outs = m.generate(prompts, max_new_tokens=12)
    for p, o in zip(prompts, outs):
        want = reference_greedy(ref, m.tokenizer.encode(p), 12)
        assert o.token_ids == want, f"{p!r}: {o.token_ids} != reference {want}"
        assert o.text == m.tokenizer.decode(want) and o.finish_reason == "length"


def test_decode_steps_equal_the_full_forward(seed_lstm):
    """Prefill + decode steps on the cached state give the logits of a full forward over the whole sequence."""
    m = aigc_rt.load(seed_lstm[0], backend="cpu")
    ids = torch.randint(0, len(CHARS), (2, 11), generator=torch.Generator().manual_seed(2))
    full = m.logits(ids)  # (2, 11, V)
    with torch.inference_mode():
        cache = m.new_cache(2, 11)
        m.prefill(ids[:, :5], cache)
        for t in range(5, 11):
            got = m.decode(ids[:, t], torch.full((2,), t), cache, t + 1)
            err = (got - full[:, t]).abs().max().item()
            assert err <= ATOL, f"step {t}: max |logit error| {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_are_the_modules(seed_lstm, backend):
    """generate(logprobs=True) on the LSTM: each greedy token's log-probability is the torch module's
    log_softmax at that step (the module carrying its own (h, c)). Tolerance: atol 1e-4."""
    m = load_on(seed_lstm[0], backend)
    ids = m.tokenizer.encode("hello")
    got = m.generate(ids, max_new_tokens=6, eos_token_id=[], logprobs=True)[0]
    want = []
    with torch.no_grad():
        logits, state = seed_lstm[1](torch.tensor(ids)[:, None])
        for t in got.token_ids:
            want.append(torch.log_softmax(logits[-1, 0], -1)[t].item())
            logits, state = seed_lstm[1](torch.tensor([[t]]), state)
    assert got.token_ids == reference_greedy(seed_lstm[1], ids, 6)
    err = max(abs(a - b) for a, b in zip(got.logprobs, want))
    assert err <= 1e-4, f"max log-probability error {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_perplexity_is_the_modules(seed_lstm, backend):
    """perplexity() on the LSTM (no context limit: one window) is the torch module's summed NLL of the text.
    Tolerance: 1e-5 relative."""
    m = load_on(seed_lstm[0], backend)
    text = "hello world, 落霞与孤鹜齐飞 again and again.\n" * 3
    ids = m.tokenizer.encode(text)
    with torch.no_grad():
        logits, _ = seed_lstm[1](torch.tensor(ids)[:, None])  # (T, 1, V)
    want = -torch.log_softmax(logits[:-1, 0].double(), -1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    got = m.perplexity(text)
    assert got.tokens == len(ids) - 1 and got.nll == pytest.approx(want, rel=1e-5)


def test_sampling_is_seeded_and_independent_of_the_batch(seed_lstm):
    m = aigc_rt.load(seed_lstm[0], backend="cpu")
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    alone = m.generate("abc", **kw)[0]
    batched = m.generate(["落霞", "abc", "xyz!"], **kw)[1]
    assert alone.token_ids == batched.token_ids
    several = m.generate("abc", num_return_sequences=3, **kw)
    assert several[0].token_ids == alone.token_ids and len({tuple(o.token_ids) for o in several}) > 1
    assert "".join(m.stream("abc", **kw)) == alone.text


def test_cpu_replay_equals_eager_steps(seed_lstm):
    m = aigc_rt.load(seed_lstm[0], backend="cpu")
    kw = dict(max_new_tokens=9, do_sample=True, seed=3, repetition_penalty=1.3)
    replayed = [o.token_ids for o in m.generate(["ab", "落霞与"], **kw)]
    m.backend.replay = False
    assert [o.token_ids for o in m.generate(["ab", "落霞与"], **kw)] == replayed


@pytest.mark.parametrize("H", [1, 7, 17, 111])
def test_cpu_lstm_cell_matches_the_reference(isa, H):
    from aigc_rt import _C
    g = torch.Generator().manual_seed(H)
    gates = torch.randn(3, 4 * H, generator=g) * 6
    gates[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])[: min(4, 4 * H)]  # saturated and zero inputs
    c = torch.randn(3, H, generator=g) * 4
    want_h, want_c = TorchBackend(torch.device("cpu")).lstm_cell(gates, c)
    h = torch.empty(3, H)
    _C.lstm_cell(gates, c, h, c)  # c updated in place, as the decode step does
    for name, got, want in (("h", h, want_h), ("c", c, want_c)):
        err = (got - want).abs().max().item()
        assert err <= 1e-6, f"{isa}, H={H}: max |{name} error| {err:.3g} > 1e-6"


def test_cpu_lstm_cell_refuses_bad_buffers():
    from aigc_rt import _C
    gates, c = torch.zeros(2, 12), torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"gates has shape \[2, 8\], expected \(2, 12\)"):
        _C.lstm_cell(torch.zeros(2, 8), c, torch.empty(2, 3), torch.empty(2, 3))
    with pytest.raises(ValueError, match="h_out must not overlap"):
        _C.lstm_cell(gates, c, c, torch.empty(2, 3))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
def test_low_precision_files(seed_lstm, tmp_path, dtype):
    from aigc_rt.cli import VALIDATE_TOL
    src = seed_lstm[0].replace(".safetensors", ".pt")
    m = aigc_rt.load(aigc_rt.convert(src, tmp_path / f"{dtype}.safetensors", dtype=dtype), backend="cpu")
    ids = torch.randint(0, len(CHARS), (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = seed_lstm[1](ids.t())[0].transpose(0, 1)
    atol, rtol = VALIDATE_TOL[dtype]
    err, tol = (m.logits(ids) - want).abs().max().item(), atol + rtol * want.abs().max().item()
    assert err <= tol, f"{dtype}: max |logit error| {err:.3g} > {tol:.3g}"


def test_int4_file(seed_lstm, tmp_path):
    """int4 needs an even number of inputs per matrix: the seed LSTM's odd sizes (13 -> 23) are refused by name;
    an LSTM of even sizes converts (its embedding stays int8), and the cpu backend's logits match the torch backend's
    on the same file (activations in int8 blocks: 1e-2 of max |logit|) and the fp32 module within validate's int4
    tolerance."""
    from aigc_rt.cli import VALIDATE_TOL
    src = seed_lstm[0].replace(".safetensors", ".pt")
    with pytest.raises(FormatError, match="int4 matrices need an even number of inputs; 'layers.0.ih.weight' has 13"):
        aigc_rt.convert(src, tmp_path / "odd.safetensors", dtype="int4")
    torch.manual_seed(5)
    ref = CharLSTM(len(CHARS), 14, 24, 2).eval()
    torch.save(ref.state_dict(), tmp_path / "even.pt")
    (tmp_path / "vocab.json").write_text(json.dumps(CHARS, ensure_ascii=False), encoding="utf-8")
    path = aigc_rt.convert(tmp_path / "even.pt", tmp_path / "even.safetensors", dtype="int4")
    ids = torch.randint(0, len(CHARS), (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids.t())[0].transpose(0, 1)
    cpu, same_file = aigc_rt.load(path, backend="cpu").logits(ids), aigc_rt.load(path, backend="torch").logits(ids)
    err, tol = (cpu - same_file).abs().max().item(), 1e-2 * same_file.abs().max().item()
    assert err <= tol, f"cpu vs torch backend: max |logit difference| {err:.3g} > {tol:.3g}"
    atol, rtol = VALIDATE_TOL["int4"]
    err, tol = (cpu - want).abs().max().item(), atol + rtol * want.abs().max().item()
    assert err <= tol, f"int4 vs the fp32 module: max |logit error| {err:.3g} > {tol:.3g}"


def test_lstm_without_biases(tmp_path):
    ref = make_checkpoint(tmp_path, seed=4, bias=False)
    m = aigc_rt.load(aigc_rt.convert(tmp_path / "model.pt", tmp_path / "m.safetensors"), backend="cpu")
    ids = torch.randint(0, len(CHARS), (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(ids.t())[0].transpose(0, 1)
    assert (m.logits(ids) - want).abs().max().item() <= ATOL


def test_character_vocabulary(seed_lstm):
    tok = aigc_rt.load(seed_lstm[0], backend="torch").tokenizer
    text = "落霞与孤鹜齐飞,秋水共长天一色!\n"
    ids = tok.encode(text)
    assert ids == [CHARS.index(ch) for ch in text] and tok.decode(ids) == text
    with pytest.raises(ValueError, match=r"lacks: 'Z' at index 3"):
        tok.encode("abcZ")


@pytest.mark.parametrize("vocab, message", [
    (["a", "bc"], r"entry 'bc' is not one character"),
    ({"a": 0, "b": 0}, "two characters share an id"),
    ({"a": -1}, r"the id of 'a' must be an int >= 0"),
    ("abc", "expected a tokenizers tokenizer.json, or a character vocabulary"),
    (CHARS + ["!"], "character '!' appears twice in the vocabulary"),
    (CHARS + ["@"], "the tokenizer has 47 tokens but the model only 46"),
])
def test_converter_checks_the_vocabulary(tmp_path, vocab, message):
    make_checkpoint(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(FormatError, match=message):
        aigc_rt.convert(tmp_path / "model.pt", tmp_path / "m.safetensors")


def test_a_vocabulary_smaller_than_the_embedding(tmp_path):
    """Rows past the vocabulary decode to nothing (as for GPT-2 files whose embedding is padded)."""
    make_checkpoint(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps(list("abc")))
    m = aigc_rt.load(aigc_rt.convert(tmp_path / "model.pt", tmp_path / "m.safetensors"), backend="torch")
    assert m.tokenizer.encode("cab") == [2, 0, 1] and m.tokenizer.decode([0, 45, 2]) == "ac"


def test_converter_rejects_what_it_cannot_run(tmp_path):
    cases = {
        "bidirectional": (dict(bidirectional=True), "a bidirectional LSTM cannot generate text"),
        "projections": (dict(proj_size=5), r"projections \(proj_size > 0\) are not supported"),
    }
    for name, (kwargs, message) in cases.items():
        folder = tmp_path / name
        make_checkpoint(folder, **kwargs) if name != "projections" else _projection_checkpoint(folder)
        with pytest.raises(FormatError, match=message):
            aigc_rt.convert(folder / "model.pt", folder / "m.safetensors")

    folder = tmp_path / "no_vocab"
    make_checkpoint(folder)
    (folder / "vocab.json").unlink()
    with pytest.raises(FormatError, match="holds no vocabulary: pass tokenizer="):
        aigc_rt.convert(folder / "model.pt", folder / "m.safetensors")
    (tmp_path / "chars.json").write_text(json.dumps(CHARS))
    aigc_rt.convert(folder / "model.pt", folder / "m.safetensors", tokenizer=tmp_path / "chars.json")

    sd = torch.load(folder / "model.pt")
    sd["out.weight"] = sd["out.weight"][:40]
    sd["out.bias"] = sd["out.bias"][:40]
    torch.save(sd, folder / "short_head.pt")
    with pytest.raises(FormatError, match="the embedding has 46 rows but the output Linear out makes 40 logits"):
        aigc_rt.convert(folder / "short_head.pt", folder / "m.safetensors", tokenizer=tmp_path / "chars.json")
    sd = torch.load(folder / "model.pt")
    sd["norm.weight"] = torch.ones(23)
    torch.save(sd, folder / "extra.pt")
    with pytest.raises(FormatError, match=r"unexpected modules \['norm'\]"):
        aigc_rt.convert(folder / "extra.pt", folder / "m.safetensors", tokenizer=tmp_path / "chars.json")


def _projection_checkpoint(folder):
    folder.mkdir(parents=True)
    model = nn.ModuleDict({"embed": nn.Embedding(46, 13), "rnn": nn.LSTM(13, 23, 1, proj_size=5)})
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "vocab.json").write_text(json.dumps(CHARS))


def test_tokenizer_is_only_for_checkpoints_without_one(seed_lstm, hf_odd, tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer= is for checkpoints without a vocabulary \(lstm, transformer_decoder\); a gpt2"):
        aigc_rt.convert(hf_odd[0], tmp_path / "g.safetensors", tokenizer=tmp_path / "vocab.json")


def test_cli_convert_and_validate(tmp_path, capsys):
    from aigc_rt.cli import main
    make_checkpoint(tmp_path)
    (tmp_path / "chars.json").write_text(json.dumps(CHARS))
    (tmp_path / "vocab.json").unlink()
    dst = str(tmp_path / "m.safetensors")
    assert main(["convert", str(tmp_path / "model.pt"), dst, "--tokenizer", str(tmp_path / "chars.json")]) == 0
    assert main(["validate", dst, "--reference", str(tmp_path / "model.pt")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "greedy 16 tokens identical" in out
    assert main(["generate", "落霞与孤鹜齐飞", "--model", dst, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("落霞与孤鹜齐飞")


def test_bench_cli_times_an_lstm_file(seed_lstm, tmp_path, capsys):
    """`aigc-rt bench --model` on an LSTM file: the weights a step streams are every matrix but the embedding."""
    from aigc_rt import bench
    from aigc_rt.cli import main
    from aigc_rt.config import LSTMConfig
    assert main(["bench", "--model", seed_lstm[0], "--batches", "1", "--new-tokens", "5", "--repeats", "1",
                 "--out", str(tmp_path)]) == 0
    assert "| 1 | aigc-rt/cpu | fp32 |" in capsys.readouterr().out
    c = LSTMConfig(vocab_size=46, n_embd=13, hidden_size=23, n_layer=3)
    matrices = 4 * 23 * (13 + 23) + 2 * 4 * 23 * (23 + 23) + 46 * 23  # W_ih + W_hh per layer, the head
    assert bench.streamed_bytes(c, "fp32", "lstm") == 4 * (matrices + 3 * 4 * 23 + 46)  # + the biases


@pytest.mark.parametrize("N,H", [(1, 1), (3, 17), (2, 300), (5, 1023)])
def test_triton_lstm_cell_matches_the_reference(N, H):
    """kernels/lstm.py on odd shapes, saturated and zero inputs, strided rows (a prefill time step), c updated in
    place; fp32, atol 1e-6 + rtol 1e-6 (tanh and sigmoid from exp; |c| reaches ~20)."""
    from aigc_rt.kernels import lstm
    g = torch.Generator().manual_seed(N * H)
    gates = torch.randn(N, 2, 4 * H, generator=g)[:, 0] * 6  # rows at stride 8H
    gates[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])[: min(4, 4 * H)]
    c = torch.randn(N, H, generator=g) * 4
    want_h, want_c = lstm.reference(gates, c)
    gates, c = gates.to(DEV), c.to(DEV)
    h, c_new = lstm.lstm_cell(gates, c, c_out=c)
    assert c_new is c
    for name, got, want in (("h", h.cpu(), want_h), ("c", c.cpu(), want_c)):
        err = ((got - want).abs() - 1e-6 * want.abs()).max().item()
        assert err <= 1e-6, f"{N}x{H}: max |{name} error| - 1e-6 |{name}| = {err:.3g} > 1e-6"


def test_triton_lstm_cell_refuses_bad_buffers():
    from aigc_rt.kernels import lstm
    gates, c = torch.zeros(2, 12, device=DEV), torch.zeros(2, 3, device=DEV)
    with pytest.raises(ValueError, match=r"gates has shape \(2, 8\), expected \(2, 12\)"):
        lstm.lstm_cell(torch.zeros(2, 8, device=DEV), c)
    with pytest.raises(ValueError, match="h_out must not overlap"):
        lstm.lstm_cell(gates, c, h_out=c)
    with pytest.raises(ValueError, match="c_out must be c itself or apart"):
        lstm.lstm_cell(gates, c, c_out=gates[:, :3])


def test_tokenizer_json_whose_decoder_we_cannot_follow(tmp_path):
    """A tokenizers JSON is taken as it is when its tokens decode by concatenation (the Fuse decoder) or as
    byte-level BPE; another decoder (WordPiece's "##" joins, say) is refused by name, not decoded wrongly."""
    from tokenizers import Tokenizer, decoders, models
    make_checkpoint(tmp_path)
    tok = Tokenizer(models.WordLevel({ch: i for i, ch in enumerate(CHARS)}, unk_token="a"))
    tok.decoder = decoders.WordPiece()
    tok.save(str(tmp_path / "wordpiece.json"))
    with pytest.raises(FormatError, match="its WordPiece decoder is not supported"):
        aigc_rt.convert(tmp_path / "model.pt", tmp_path / "m.safetensors", tokenizer=tmp_path / "wordpiece.json")
    tok = Tokenizer(models.BPE({ch: i for i, ch in enumerate(CHARS)}, []))  # a character per token
    tok.decoder = decoders.Fuse()
    tok.save(str(tmp_path / "fuse.json"))
    m = aigc_rt.load(aigc_rt.convert(tmp_path / "model.pt", tmp_path / "m.safetensors",
                                     tokenizer=tmp_path / "fuse.json"), backend="torch")
    assert m.tokenizer.decode(m.tokenizer.encode("ab")) == "ab"
