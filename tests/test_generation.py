"""generate / stream: HF semantics, ragged batches, seeds, stop strings, streaming, and bad input."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import aigc_rt

BACKENDS = ["torch", "cpu"]
PROMPTS = ["Beautiful is", "Flat is better than nested. Sparse", "落霞与孤鹜齐飞", "x"]


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, rt_odd):
    return aigc_rt.load(rt_odd[0], backend=request.param)


def test_greedy_batch_equals_one_by_one(model):
    batch = model.generate(PROMPTS, max_new_tokens=12, eos_token_id=[])
    for prompt, got in zip(PROMPTS, batch):
        alone = model.generate(prompt, max_new_tokens=12, eos_token_id=[])[0]
        assert got.token_ids == alone.token_ids, prompt
        assert got.finish_reason == "length" and len(got.token_ids) == 12


def test_ragged_token_id_batch_and_single_id_list(model):
    ids = [model.tokenizer.encode(p) for p in PROMPTS]
    assert [c.token_ids for c in model.generate(ids, max_new_tokens=5)] == \
           [c.token_ids for c in model.generate(PROMPTS, max_new_tokens=5)]
    assert model.generate(ids[0], max_new_tokens=5)[0].token_ids == model.generate(PROMPTS[0], max_new_tokens=5)[0].token_ids


def test_greedy_matches_hf_for_a_ragged_batch(model, rt_odd):
    hf = rt_odd[1]
    hf.generation_config.eos_token_id = None
    for prompt, got in zip(PROMPTS, model.generate(PROMPTS, max_new_tokens=10, eos_token_id=[])):
        ids = model.tokenizer.encode(prompt)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(ids):]
        assert got.token_ids == want.tolist()


def test_max_length_counts_prompt_and_new_tokens_like_hf(model, rt_odd):
    """HF's max_length (seed system 1 calls generate(max_length=100)): prompt + new tokens per sequence, so a
    ragged batch gives each sequence its own budget; max_new_tokens wins when both are given."""
    hf = rt_odd[1]
    hf.generation_config.eos_token_id = None
    batch = model.generate(PROMPTS, max_length=12, eos_token_id=[])
    for prompt, got in zip(PROMPTS, batch):
        ids = model.tokenizer.encode(prompt)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_length=12, do_sample=False, pad_token_id=0)[0, len(ids):]
        assert got.token_ids == want.tolist() and len(ids) + len(got.token_ids) == 12, prompt
        assert got.finish_reason == "length"
    both = model.generate(PROMPTS[0], max_length=12, max_new_tokens=3, eos_token_id=[])[0]
    assert both.token_ids == batch[0].token_ids[:3]


SAMPLE = dict(do_sample=True, top_k=50, temperature=0.7, max_new_tokens=16, eos_token_id=[])


def test_seed_makes_output_independent_of_the_batch(model):
    alone = model.generate(PROMPTS[2], seed=11, **SAMPLE)[0]
    assert model.generate(PROMPTS[2], seed=11, **SAMPLE)[0] == alone  # run to run
    for batch in (PROMPTS, PROMPTS[::-1], [PROMPTS[2]] * 3):
        outs = model.generate(batch, seed=11, **SAMPLE)
        for p, o in zip(batch, outs):
            if p == PROMPTS[2]:
                assert o.token_ids == alone.token_ids
    assert model.generate(PROMPTS[2], seed=12, **SAMPLE)[0].token_ids != alone.token_ids


def test_num_return_sequences_prompt_major_and_seeded(model):
    outs = model.generate(PROMPTS[:2], num_return_sequences=3, seed=5, **SAMPLE)
    assert len(outs) == 6
    for i, p in enumerate(PROMPTS[:2]):
        alone = model.generate(p, num_return_sequences=3, seed=5, **SAMPLE)
        assert [o.token_ids for o in outs[3 * i: 3 * i + 3]] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3  # the three sequences differ


def test_several_sequences_start_from_one_prefill_per_prompt(model, monkeypatch):
    """num_return_sequences=n prefills each prompt once and copies its cache rows and last logits to its n
    sequences: with top_k=1 every sequence is the prompt's greedy continuation (a wrong row would stray), and
    sequence 0 draws what a lone sequence with the same seed draws."""
    rows = []
    prefill = model.prefill
    monkeypatch.setattr(model, "prefill", lambda ids, *a, **kw: rows.append(ids.shape[0]) or prefill(ids, *a, **kw))
    greedy = model.generate(PROMPTS, max_new_tokens=8, eos_token_id=[])
    rows.clear()
    outs = model.generate(PROMPTS, max_new_tokens=8, eos_token_id=[], do_sample=True, top_k=1,
                          num_return_sequences=3, seed=2)
    assert rows == [len(PROMPTS)], f"prefilled {rows} rows; expected one row per prompt"
    for i, g in enumerate(greedy):
        assert [o.token_ids for o in outs[3 * i: 3 * i + 3]] == [g.token_ids] * 3, PROMPTS[i]
    sampled = model.generate(PROMPTS[1], num_return_sequences=4, seed=9, **SAMPLE)
    assert sampled[0].token_ids == model.generate(PROMPTS[1], seed=9, **SAMPLE)[0].token_ids
    assert len({tuple(o.token_ids) for o in sampled}) > 1


def test_greedy_with_several_sequences_raises_like_hf(model, rt_odd):
    """Hugging Face's GenerationConfig.validate(): greedy search without beams does not support
    num_return_sequences != 1 (a ValueError); so neither do we, saying what to pass instead."""
    ids = model.tokenizer.encode(PROMPTS[0])
    with pytest.raises(ValueError, match="num_return_sequences"):
        with torch.no_grad():
            rt_odd[1].generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False, num_return_sequences=2,
                               pad_token_id=0)
    for call in (lambda: model.generate(ids, num_return_sequences=2, max_new_tokens=6),
                 lambda: model.generate(ids, num_return_sequences=3, do_sample=False, temperature=0.9)):
        with pytest.raises(ValueError) as e:
            call()
        assert "num_return_sequences=" in str(e.value) and "do_sample=True" in str(e.value), str(e.value)


def test_seed_systems_calls(model):
    """SEED_SYSTEMS.md: generate(do_sample=True, top_k=50, temperature=0.7) and
    generate(num_return_sequences=5, temperature=0.9)."""
    a = model.generate("落霞与孤鹜齐飞", max_new_tokens=20, do_sample=True, top_k=50, temperature=0.7, seed=0)
    b = model.generate("Hello", max_new_tokens=20, do_sample=True, num_return_sequences=5, temperature=0.9, seed=0)
    assert len(a) == 1 and len(b) == 5 and all(isinstance(o.text, str) for o in a + b)


def test_eos_finishes_and_is_returned(model):
    base = model.generate(PROMPTS[0], max_new_tokens=10, eos_token_id=[])[0].token_ids
    eos = base[3]
    first = base.index(eos)
    out = model.generate([PROMPTS[0], PROMPTS[1]], max_new_tokens=10, eos_token_id=eos)
    assert out[0].finish_reason == "eos" and out[0].token_ids == base[: first + 1]
    assert out[0].text == model.tokenizer.decode(base[:first + 1])
    # the other sequence goes on after its neighbour left the batch, unchanged
    other = model.generate(PROMPTS[1], max_new_tokens=10, eos_token_id=eos)[0]
    assert out[1].token_ids == other.token_ids
    # several eos ids
    out2 = model.generate(PROMPTS[0], max_new_tokens=10, eos_token_id=[12345 % 1000, eos])[0]
    assert out2.finish_reason == "eos" and out2.token_ids[-1] in (eos, 345)


def _token_offsets(tokenizer, ids):
    """{i: len(text of ids[:i])} for the boundaries i where the bytes of ids[:i] are complete, valid UTF-8
    (there the decoded prefix is a prefix of the decoded whole)."""
    out, data = {}, b""
    for i in range(len(ids) + 1):
        try:
            out[i] = len(data.decode("utf-8"))
        except UnicodeDecodeError:
            pass
        if i < len(ids):
            data += tokenizer.token_bytes(ids[i])
    return out


@pytest.fixture(scope="module", params=BACKENDS)
def tiny(request):
    """The embedded trained model: unlike the random-init ones, it writes words (multi-character tokens)."""
    return aigc_rt.load(backend=request.param)


def test_stop_string_spanning_tokens(tiny):
    model = tiny
    full = model.generate(PROMPTS[1], max_new_tokens=24, eos_token_id=[])[0]
    ids, text = full.token_ids, full.text
    off = _token_offsets(model.tokenizer, ids)
    assert off[0] == 0 and text.startswith(model.tokenizer.decode(ids[: max(off)]))
    # a stop string made of the end of token k-1's text and the start of token k's, whose FIRST occurrence in
    # the text is that one: it provably starts in one token and ends in the next
    found = None
    for k in range(1, len(ids) - 1):
        if not all(i in off for i in (k - 1, k, k + 1)):
            continue
        a, b, c = off[k - 1], off[k], off[k + 1]  # token k-1's text is text[a:b], token k's is text[b:c]
        if b - a < 2 or c - b < 2 or not text[a:c].strip():
            continue  # want a word-sized piece on each side
        for left in range(1, b - a + 1):
            for right in range(1, c - b + 1):
                stop = text[b - left: b + right]
                if left + right >= 3 and "\ufffd" not in stop and text.find(stop) == b - left:
                    found = (k, b - left, stop)
                    break
            if found:
                break
        if found:
            break
    assert found, f"no stop string spanning a token boundary in {text!r}"
    k, start, stop = found
    assert off[k - 1] <= start < off[k] < start + len(stop) <= off[k + 1], (k, start, stop, off)
    out = model.generate(PROMPTS[1], max_new_tokens=24, eos_token_id=[], stop=["never-there", stop])[0]
    assert out.finish_reason == "stop", (stop, out)
    assert out.text == text[:start], (stop, out.text, text[:start])
    assert out.token_ids == ids[: k + 1], (stop, out.token_ids, ids[: k + 1])  # ends with the token completing it
    streamed = "".join(model.stream(PROMPTS[1], max_new_tokens=24, eos_token_id=[], stop=stop))
    assert streamed == out.text


@pytest.mark.parametrize("prompt", ["落霞与孤鹜齐飞", "emoji 🙂🚀"])
def test_stream_concatenates_to_generate(model, prompt):
    kwargs = dict(max_new_tokens=30, do_sample=True, temperature=1.0, seed=3, eos_token_id=[])
    pieces = list(model.stream(prompt, **kwargs))
    assert "".join(pieces) == model.generate(prompt, **kwargs)[0].text
    assert all(pieces)


def utf8_missing(data: bytes) -> int | None:
    """0 if data is complete UTF-8, n > 0 if it is valid but its last character lacks n bytes, None if invalid."""
    try:
        data.decode("utf-8")
        return 0
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data":
            return None
        lead = data[e.start]
        return (2 if lead < 0xE0 else 3 if lead < 0xF0 else 4) - (len(data) - e.start)


class Utf8Sampler:
    """Wraps a backend's sample() for one sequence of max_new tokens: before the real, seeded draw, the logits of
    tokens that would make the generated bytes invalid UTF-8, or leave a character unfinished when the tokens
    run out, or that have no bytes (special tokens, ids past the tokenizer's vocabulary) are pushed to -1e30
    (finite: the samplers reject non-finite rows). A random-init model then writes valid UTF-8 while staying
    free to split characters across byte-level BPE tokens."""

    def __init__(self, sample, tokenizer, vocab_size: int, max_new: int):
        self.real, self.max_new = sample, max_new
        self.token_bytes = [tokenizer.token_bytes(t) for t in range(vocab_size)]
        self.data, self.step = b"", 0

    def __call__(self, logits, params, u, seen, *, out=None):
        assert logits.shape[0] == 1
        left = self.max_new - self.step - 1  # tokens after this one, each able to add one continuation byte
        ok = [b != b"" and (n := utf8_missing(self.data + b)) is not None and n <= left for b in self.token_bytes]
        logits = torch.where(torch.tensor(ok, device=logits.device), logits, torch.full_like(logits, -1e30))
        tokens = self.real(logits, params, u, seen, out=out)
        self.data += self.token_bytes[int(tokens[0])]
        self.step += 1
        return tokens


@pytest.mark.parametrize("prompt", ["落霞与孤鹜齐飞", "emoji 🙂🚀"])
def test_stream_pieces_are_whole_characters(model, prompt, monkeypatch):
    """Seeded sampling that splits multi-byte characters across tokens: every streamed piece is valid text
    without U+FFFD, and the pieces concatenate to generate()'s text and to the `tokenizers` library's decode."""
    kwargs = dict(max_new_tokens=30, do_sample=True, temperature=1.0, seed=3, eos_token_id=[])
    real = model.backend.sample

    def constrained():
        monkeypatch.setattr(model.backend, "sample", Utf8Sampler(real, model.tokenizer, model.config.vocab_size, 30))

    constrained()
    out = model.generate(prompt, **kwargs)[0]
    constrained()
    pieces = list(model.stream(prompt, **kwargs))
    assert len(out.token_ids) == 30
    partial = [t for t in out.token_ids if utf8_missing(model.tokenizer.token_bytes(t)) != 0]
    assert partial, f"no token of {out.token_ids} is an incomplete UTF-8 sequence: nothing was split"
    reference = model.tokenizer._tok.decode(out.token_ids, skip_special_tokens=True)  # the `tokenizers` library
    assert "".join(pieces) == out.text == reference, (pieces, out.text, reference)
    for p in pieces:
        assert p and "\ufffd" not in p and p.encode("utf-8").decode("utf-8") == p, (p, pieces)
    assert any(ord(ch) > 0x7F for ch in out.text), out.text  # multi-byte characters made it out whole


def test_stream_decoder_never_splits_a_character(model):
    text = "落霞与孤鹜齐飞，秋水共长天一色 🙂🚀 ünï"
    ids = model.tokenizer.encode(text)
    assert any("\ufffd" in model.tokenizer.decode([t]) for t in ids)  # some tokens are partial characters
    dec = model.tokenizer.stream_decoder()
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("kwargs,message", [
    (dict(do_sample=True, temperature=0), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-3), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(num_return_sequences=0), "num_return_sequences"), (dict(seed="x"), "seed"),
    (dict(stop=[""]), "stop"), (dict(eos_token_id=5000), "eos_token_id"),
    (dict(max_new_tokens=60), r"has \d+ tokens; with max_new_tokens=60 that is \d+, past the context length 64"),
    (dict(max_length=1), "max_length"), (dict(max_length=5), r"max_length=5 \(prompt \+ new tokens\) leaves no room"),
    (dict(max_length=65), r"with max_length=65 that is 65, past the context length 64"),
    (dict(logprobs="yes"), "logprobs must be True or False"),
])
def test_invalid_parameters_raise_before_work(model, kwargs, message, no_work):
    with pytest.raises(ValueError, match=message):
        model.generate("Flat is better than nested. Sparse is better", **kwargs)
    assert no_work == [], f"work was done before the ValueError: {no_work}"


@pytest.fixture
def no_work(model, monkeypatch):
    """Spies on the model's new_cache/prefill/decode/decode_sample: the list of calls made (each still runs)."""
    calls = []
    for name in ("new_cache", "prefill", "decode", "decode_sample"):
        def spy(*args, _name=name, _real=getattr(model, name)):
            calls.append(_name)
            return _real(*args)
        monkeypatch.setattr(model, name, spy)
    return calls


@pytest.mark.parametrize("kwargs,name,allowed", [
    (dict(do_sample=True, temperature=math.inf), "temperature", "a finite number > 0 when sampling"),
    (dict(do_sample=True, temperature=-math.inf), "temperature", "a finite number > 0 when sampling"),
    (dict(do_sample=True, temperature=math.nan), "temperature", "a finite number > 0 when sampling"),
    (dict(do_sample=True, temperature=0.0), "temperature", "a finite number > 0 when sampling"),
    (dict(top_p=1.5), "top_p", "in (0, 1]"), (dict(top_p=0), "top_p", "in (0, 1]"),
    (dict(top_p=-0.1), "top_p", "in (0, 1]"), (dict(top_p=math.nan), "top_p", "in (0, 1]"),
    (dict(do_sample=True, top_p=1.0000001), "top_p", "in (0, 1]"),
    (dict(top_k=-3), "top_k", ">= 0"), (dict(repetition_penalty=0), "repetition_penalty", "> 0"),
    (dict(repetition_penalty=math.nan), "repetition_penalty", "> 0"),
    (dict(max_new_tokens=0), "max_new_tokens", ">= 1"), (dict(num_return_sequences=0), "num_return_sequences", ">= 1"),
])
def test_out_of_range_values_name_the_parameter_and_the_range(model, kwargs, name, allowed, no_work):
    with pytest.raises(ValueError) as e:
        model.generate("Beautiful is", **kwargs)
    msg = str(e.value)
    value = next(v for k, v in kwargs.items() if k == name)
    assert msg.startswith(name) and allowed in msg and f"got {value}" in msg, msg
    assert no_work == [], f"work was done before the ValueError: {no_work}"


STREAM_BAD = [  # (prompt, kwargs, message)
    ("Hi", dict(do_sample=True, temperature=0), "temperature must be"),
    ("Hi", dict(do_sample=True, temperature=math.nan), "temperature must be"),
    ("Hi", dict(top_p=1.5), r"top_p must be in \(0, 1\]"), ("Hi", dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ("Hi", dict(do_sample=True, num_return_sequences=2), "num_return_sequences must be 1"),
    ("Hi", dict(max_new_tokens=0), "max_new_tokens must be >= 1"), ("Hi", dict(stop=""), "stop must be"),
    ("", {}, "prompt 0 is empty"), ([], {}, "not empty"), (["a", "b"], {}, "one prompt, got a batch of 2"),
    ([1] * 64, dict(max_new_tokens=1), "past the context length 64"), ([1, 5000], {}, "token id 5000"),
]


@pytest.mark.parametrize("prompt,kwargs,message", STREAM_BAD)
def test_stream_raises_when_called_not_when_iterated(model, prompt, kwargs, message, no_work):
    """m.stream(...) itself raises (it is not a generator function whose body runs at the first next())."""
    with pytest.raises(ValueError, match=message):
        model.stream(prompt, **kwargs)
    assert no_work == [], f"work was done before the ValueError: {no_work}"


def test_stream_does_not_leave_inference_mode_on(model):
    """Between pieces (and after the caller drops the stream half-way) the caller's code runs with autograd."""
    it = model.stream("Beautiful is", max_new_tokens=8, eos_token_id=[])
    assert next(it)
    assert not torch.is_inference_mode_enabled()
    x = torch.ones(3, requires_grad=True)
    (2 * x).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0, 2.0]
    del it
    assert not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("prompts,message", [
    ("", "prompt 0 is empty"), ([], "not empty"), ([[1, 2], []], "prompt 1 is empty"),
    ([1, 1000], "token id 1000 is outside the vocabulary"), ([[3], [-1]], "token id -1"), (3.5, "prompts must be"),
])
def test_invalid_prompts(model, prompts, message, no_work):
    with pytest.raises(ValueError, match=message):
        model.generate(prompts, max_new_tokens=2)
    assert no_work == [], f"work was done before the ValueError: {no_work}"


def test_prompt_plus_new_tokens_may_equal_context(model):
    out = model.generate([1] * 60, max_new_tokens=4, eos_token_id=[])[0]
    assert len(out.token_ids) == 4


def test_repetition_penalty_matches_hf_generate(model, rt_odd):
    hf = rt_odd[1]
    hf.generation_config.eos_token_id = None
    ids = model.tokenizer.encode(PROMPTS[1])
    got = model.generate(ids, max_new_tokens=16, repetition_penalty=1.8, eos_token_id=[])[0].token_ids
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, repetition_penalty=1.8,
                           pad_token_id=0)[0, len(ids):].tolist()
    assert got == want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [{}, dict(do_sample=True, top_k=5), dict(repetition_penalty=1.3),
                                    dict(logprobs=True)])
def test_nan_logits_raise(rt_odd, backend, kwargs):
    """NaN logits end the generation with an error that says so, also where the sampled -1 would index the seen
    set (repetition penalty) or the log-probabilities."""
    m = aigc_rt.load(rt_odd[0], backend=backend)
    m.ln_f[0][3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or inf in the logits"):
        m.generate("Beautiful", max_new_tokens=3, **kwargs)


def test_unwritten_cache_slots_never_leak(model, monkeypatch):
    """KV-cache slots past a sequence's length are never read: fill every fresh cache with NaN first."""
    new_cache = model.new_cache

    def nan_cache(*args):
        cache = new_cache(*args)
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
        return cache

    monkeypatch.setattr(model, "new_cache", nan_cache)
    model.decode_buffers.clear()  # else a kept cache of an earlier generation serves (see the tests below)
    out = model.generate(PROMPTS, max_new_tokens=6, num_return_sequences=2, do_sample=True, seed=1)
    assert len(out) == 8


def test_default_eos_comes_from_the_model_config(model, hf_odd, tmp_path):
    """Without eos_token_id, generation stops at the config's eos_token_id, as HF generate does with the
    checkpoint's generation_config: a copy of the checkpoint whose eos is a token its greedy continuation makes."""
    from transformers import GPT2LMHeadModel
    ids = model.tokenizer.encode(PROMPTS[0])
    hf = hf_odd[1]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        cont = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):]
    eos = cont.tolist()[4]
    src = tmp_path / "hf"
    shutil.copytree(hf_odd[0], src)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((src / name).read_text())
        cfg["eos_token_id"] = eos
        (src / name).write_text(json.dumps(cfg))
    ref = GPT2LMHeadModel.from_pretrained(src).eval()
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(ids):]
    want = want.tolist()
    assert want[-1] == eos and len(want) <= 5, want  # HF stopped at the configured eos
    m = aigc_rt.load(aigc_rt.convert(src, tmp_path / "eos.safetensors"), backend=model.backend.name)
    assert m.config.eos_token_id == eos
    got = m.generate(ids, max_new_tokens=12)[0]
    assert got.token_ids == want and got.finish_reason == "eos", (got, want)
    assert "".join(m.stream(ids, max_new_tokens=12)) == got.text
    full = m.generate(ids, max_new_tokens=12, eos_token_id=[])[0]  # an explicit eos_token_id overrides it
    assert full.token_ids == cont.tolist() and full.finish_reason == "length"


@pytest.mark.parametrize("kwargs", [dict(), dict(do_sample=True, seed=7, num_return_sequences=2,
                                                  repetition_penalty=1.3)])
def test_finished_sequences_leave_the_batch(model, monkeypatch, kwargs):
    """max_length gives each prompt of a ragged batch its own budget, so rows finish at different steps: after
    each finish the cache is compacted to the rows still running and every later decode step runs on just
    those, and every output is still what its prompt gives alone."""
    lens = [len(model.tokenizer.encode(p)) for p in PROMPTS]
    L = max(lens) + 5
    n = kwargs.get("num_return_sequences", 1)
    limits = [L - k for k in lens for _ in range(n)]  # new tokens per row, prompt-major
    assert len(set(limits)) >= 3, limits
    alone = [model.generate(p, max_length=L, eos_token_id=[], **kwargs) for p in PROMPTS]

    decoded, kept = [], []  # rows in each decode step; slots kept at each compaction
    decode_sample, new_cache = model.decode_sample, model.new_cache

    def spy_decode_sample(state, cache, *args):
        B = state.tokens.shape[0]
        assert B == state.positions.shape[0] == state.u.shape[0] == cache.k.shape[1], (B, cache.k.shape)
        assert state.seen is None or state.seen.shape[0] == B
        decoded.append(B)
        return decode_sample(state, cache, *args)

    def spy_new_cache(*args):
        cache = new_cache(*args)
        keep = cache.keep

        def spy_keep(rows):
            kept.append(rows.tolist())
            keep(rows)
        cache.keep = spy_keep
        return cache

    monkeypatch.setattr(model, "decode_sample", spy_decode_sample)
    monkeypatch.setattr(model, "new_cache", spy_new_cache)
    model.decode_buffers.clear()  # else the buffers kept from `alone` serve, and new_cache is not called
    outs = model.generate(PROMPTS, max_length=L, eos_token_id=[], **kwargs)

    # expected from the limits alone: after step s (0-based) a row with limit l is still running iff l > s + 1
    want_decoded, want_kept, active = [], [], list(range(len(limits)))
    for s in range(max(limits) - 1):
        running = [r for r in active if limits[r] > s + 1]
        if len(running) < len(active):
            want_kept.append([active.index(r) for r in running])
        want_decoded.append(len(running))
        active = running
    assert decoded == want_decoded, (decoded, want_decoded)
    assert kept == want_kept, (kept, want_kept)
    assert want_decoded[0] == len(limits) > want_decoded[-1] and len(kept) >= 2  # it did shrink, twice or more
    assert [o.token_ids for o in outs] == [o.token_ids for a in alone for o in a]
    assert [len(o.token_ids) for o in outs] == limits


def test_first_generation_imports_nothing_heavy():
    """The first generate() of a process stays on the fast path: no torch._dynamo (a TorchDispatchMode or a
    torch.compile'd helper would import it, ~1.5 s), no transformers, no triton on the cpu backend."""
    import subprocess
    import sys
    code = ("import sys, aigc_rt; aigc_rt.load().generate('hi', max_new_tokens=3); "
            "aigc_rt.load('dcgan-digits').generate(2, seed=0); "
            "print(sorted(m for m in ('torch._dynamo', 'transformers', 'triton') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_pipelined_loop_gives_the_same_outputs(model, monkeypatch):
    """On a GPU the next decode step is queued before the step's tokens are read (generation.PIPELINED_DEVICES),
    so a finished row leaves the batch one step later. Forced on here: every output, streamed piece and
    finish reason is the same as without it, through eos, stop strings, ragged length budgets, sampling with
    seeds and penalties and several sequences; and each decode step runs the rows it should."""
    from aigc_rt import generation
    base = model.generate(PROMPTS[1], max_new_tokens=10, eos_token_id=[])[0].token_ids
    lens = [len(model.tokenizer.encode(p)) for p in PROMPTS]
    L = max(lens) + 5
    limits = [L - k for k in lens]
    calls = [
        dict(prompts=PROMPTS, max_new_tokens=10, eos_token_id=base[4]),
        dict(prompts=PROMPTS, max_length=L, eos_token_id=[]),
        dict(prompts=PROMPTS, max_length=L, eos_token_id=[], do_sample=True, seed=3, num_return_sequences=2,
             top_k=20, top_p=0.9, temperature=0.8, repetition_penalty=1.3),
        dict(prompts=PROMPTS[0], max_new_tokens=12, stop=model.tokenizer.decode(base[2:4]), eos_token_id=[]),
    ]

    def outputs():
        done = [[(c.text, c.token_ids, c.finish_reason) for c in model.generate(**kw)] for kw in calls]
        pieces = list(model.stream(PROMPTS[2], max_new_tokens=9, do_sample=True, seed=1))
        return done, pieces

    plain = outputs()
    decoded, decode_sample = [], model.decode_sample
    monkeypatch.setattr(model, "decode_sample",
                        lambda state, *a: decoded.append(state.tokens.shape[0]) or decode_sample(state, *a))
    monkeypatch.setattr(generation, "PIPELINED_DEVICES", {model.device.type})
    assert outputs() == plain
    decoded.clear()
    model.generate(PROMPTS, max_length=L, eos_token_id=[])
    # step s queues the next one for every row still in the batch (limit > s) while any of them goes on
    assert decoded == [sum(lim > s for lim in limits) for s in range(max(limits) - 1)], (decoded, limits)


def _model_logprobs(model, prompt_ids, new_ids) -> list[float]:
    """log p(new_ids[i] | prompt, new_ids[:i]) from one full forward (model.logits, checked against HF elsewhere)."""
    logp = model.logits(torch.tensor([prompt_ids + new_ids]))[0].log_softmax(-1)  # (T, V)
    return [logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(new_ids)]


def test_logprobs_greedy_match_hf(model, rt_odd):
    """Each new token's log-probability under the model, in fp32: Hugging Face's raw logits per step
    (output_logits), log_softmax, at the chosen token; with a repetition penalty too (it changes which token is
    chosen, not the model's distribution the log-probability is taken from). Tolerance: atol 1e-4."""
    hf = rt_odd[1]
    hf.generation_config.eos_token_id = None
    for penalty in (1.0, 1.3):
        batch = model.generate(PROMPTS, max_new_tokens=8, eos_token_id=[], repetition_penalty=penalty, logprobs=True)
        for prompt, got in zip(PROMPTS, batch):
            ids = model.tokenizer.encode(prompt)
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                                  repetition_penalty=penalty, output_logits=True, return_dict_in_generate=True)
            new = out.sequences[0, len(ids):]
            want = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, new.tolist())]
            assert got.token_ids == new.tolist(), prompt
            err = max(abs(a - b) for a, b in zip(got.logprobs, want))
            assert len(got.logprobs) == 8 and err <= 1e-4, f"{prompt!r} penalty {penalty}: max error {err:.3g}"


def test_logprobs_when_sampling_are_the_models(model):
    """Sampled with temperature, top-k, top-p and a penalty, several sequences a prompt, rows finishing at
    different steps (a ragged max_length: the batch is compacted mid-way): each token's log-probability is
    the model's (the full forward's), not the reshaped sampling distribution's. Tolerance: atol 1e-4."""
    out = model.generate(PROMPTS, max_length=14, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                         repetition_penalty=1.2, num_return_sequences=2, seed=3, eos_token_id=[], logprobs=True)
    assert len({len(c.token_ids) for c in out}) > 1  # rows finished at different steps
    for i, c in enumerate(out):
        ids = model.tokenizer.encode(PROMPTS[i // 2])
        want = _model_logprobs(model, ids, c.token_ids)
        err = max(abs(a - b) for a, b in zip(c.logprobs, want))
        assert len(c.logprobs) == len(c.token_ids) and err <= 1e-4, f"row {i}: max error {err:.3g}"
        assert all(lp <= 0 for lp in c.logprobs)


def test_logprobs_only_when_asked_and_in_the_stream_of_events(model):
    from aigc_rt.generation import run
    assert all(c.logprobs is None for c in model.generate(PROMPTS, max_new_tokens=3))
    events = list(run(model, PROMPTS[:2], max_new_tokens=3, logprobs=True))
    done = {ev.row: ev.finished for ev in events if ev.finished is not None}
    for r in done:
        assert [ev.logprob for ev in events if ev.row == r] == done[r].logprobs


def test_capacity_rounds_up_to_a_step_within_the_context():
    from aigc_rt.generation import CAPACITY_STEP, capacity
    assert [capacity(1024, n) for n in (1, CAPACITY_STEP, CAPACITY_STEP + 1, 1000, 1024)] == \
        [CAPACITY_STEP, CAPACITY_STEP, 2 * CAPACITY_STEP, 1024, 1024]
    assert capacity(100, 90) == 100


def test_generations_reuse_their_decode_buffers(model):
    """Generations of one batch size and capacity run on the same kept buffers (so a captured or recorded step
    replays), and what an earlier generation left in them never reaches a result: every kept cache slot is set to
    NaN between generations, and the outputs equal those of fresh buffers."""
    kw = dict(max_new_tokens=5, eos_token_id=[], do_sample=True, top_k=20, repetition_penalty=1.3, seed=3)
    model.decode_buffers.clear()
    fresh = [model.generate(p, **kw)[0].token_ids for p in PROMPTS[:2]]
    kept = dict(model.decode_buffers.free)
    assert len(kept) == 1, "two generations of one shape kept two sets of buffers"
    lease = next(iter(kept.values()))
    cache, state = lease.cache, lease.state
    for _ in range(2):
        with torch.inference_mode():  # the buffers are inference tensors
            for name in cache.STATE:
                getattr(cache, name).fill_(float("nan"))
            state.seen.fill_(True)
            state.tokens.fill_(-1)
        assert [model.generate(p, **kw)[0].token_ids for p in PROMPTS[:2]] == fresh
        assert next(iter(model.decode_buffers.free.values())).cache is cache  # the same buffers served again
    model.generate(PROMPTS[:2], max_new_tokens=2)  # another batch size and kind of state: new buffers
    assert len(model.decode_buffers.free) == 2


def test_kept_decode_buffers_are_bounded(model, monkeypatch):
    """At most KEPT_BUFFERS sets, the least recently used dropped first, and beyond KEPT_BYTES of caches only the
    latest set."""
    from aigc_rt import generation
    model.decode_buffers.clear()
    monkeypatch.setattr(generation, "KEPT_BUFFERS", 2)
    for B in (1, 2, 3):
        model.generate(PROMPTS[:B], max_new_tokens=2)
    assert [key[0] for key in model.decode_buffers.free] == [2, 3]
    model.generate(PROMPTS[:2], max_new_tokens=2)  # used again: the most recent
    assert [key[0] for key in model.decode_buffers.free] == [3, 2]
    cache_bytes = sum(t.nbytes for t in next(iter(model.decode_buffers.free.values())).tensors)
    monkeypatch.setattr(generation, "KEPT_BYTES", cache_bytes - 1)  # less than 3 sequences' caches
    model.generate(PROMPTS[:1], max_new_tokens=2)  # 2 + 1 sequences kept would be too many bytes
    assert [key[0] for key in model.decode_buffers.free] == [1]
    monkeypatch.setattr(generation, "KEPT_BYTES", 0)
    model.generate(PROMPTS[:3], max_new_tokens=2)  # the latest set stays whatever its size
    assert [key[0] for key in model.decode_buffers.free] == [3]


def test_interleaved_generations_get_buffers_of_their_own(model):
    """A generation started while another holds the kept buffers gets its own; both give the outputs they give
    alone. A generator dropped half-way gives its buffers back."""
    model.decode_buffers.clear()
    kw = dict(max_new_tokens=8, eos_token_id=[])
    alone = [model.generate(p, **kw)[0].text for p in PROMPTS[:2]]
    first = model.stream(PROMPTS[0], **kw)
    pieces = [next(first)]
    assert model.generate(PROMPTS[1], **kw)[0].text == alone[1]
    assert "".join(pieces + list(first)) == alone[0]
    from aigc_rt.generation import run
    events = run(model, [PROMPTS[1]], **kw)
    model.decode_buffers.clear()
    next(events)
    assert not model.decode_buffers.free  # held by the running generation
    events.close()
    assert len(model.decode_buffers.free) == 1
