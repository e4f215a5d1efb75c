"""generate / stream: HF semantics, ragged batches, seeds, stop strings, streaming, and bad input."""
from __future__ import annotations

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
    greedy = model.generate(PROMPTS[0], num_return_sequences=2, max_new_tokens=6)
    assert greedy[0].token_ids == greedy[1].token_ids


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


def test_stop_string_spanning_tokens(model):
    full = model.generate(PROMPTS[1], max_new_tokens=24, eos_token_id=[])[0]
    pieces = [model.tokenizer.decode([t]) for t in full.token_ids]
    # a stop string made of the end of token 5 and the start of token 6: it spans a token boundary
    k = 5
    while not (pieces[k] and pieces[k + 1]):
        k += 1
    stop = pieces[k][-1] + pieces[k + 1][:1]
    cut = full.text.find(stop)
    out = model.generate(PROMPTS[1], max_new_tokens=24, eos_token_id=[], stop=["never-there", stop])[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert full.token_ids[: len(out.token_ids)] == out.token_ids and len(out.token_ids) <= k + 2
    streamed = "".join(model.stream(PROMPTS[1], max_new_tokens=24, eos_token_id=[], stop=stop))
    assert streamed == out.text


@pytest.mark.parametrize("prompt", ["落霞与孤鹜齐飞", "emoji 🙂🚀"])
def test_stream_concatenates_to_generate(model, prompt):
    kwargs = dict(max_new_tokens=30, do_sample=True, temperature=1.0, seed=3, eos_token_id=[])
    pieces = list(model.stream(prompt, **kwargs))
    assert "".join(pieces) == model.generate(prompt, **kwargs)[0].text
    assert all(pieces)


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
])
def test_invalid_parameters_raise_before_work(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate("Flat is better than nested. Sparse is better", **kwargs)


@pytest.mark.parametrize("prompts,message", [
    ("", "prompt 0 is empty"), ([], "not empty"), ([[1, 2], []], "prompt 1 is empty"),
    ([1, 1000], "token id 1000 is outside the vocabulary"), ([[3], [-1]], "token id -1"), (3.5, "prompts must be"),
])
def test_invalid_prompts(model, prompts, message):
    with pytest.raises(ValueError, match=message):
        model.generate(prompts, max_new_tokens=2)


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


def test_nan_logits_raise(rt_odd):
    m = aigc_rt.load(rt_odd[0], backend="torch")
    m.ln_f[0][3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or inf in the logits"):
        m.generate("Beautiful", max_new_tokens=3)


def test_unwritten_cache_slots_never_leak(model, monkeypatch):
    """KV-cache slots past a sequence's length are never read: fill every fresh cache with NaN first."""
    new_cache = model.new_cache

    def nan_cache(*args):
        cache = new_cache(*args)
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
        return cache

    monkeypatch.setattr(model, "new_cache", nan_cache)
    out = model.generate(PROMPTS, max_new_tokens=6, num_return_sequences=2, do_sample=True, seed=1)
    assert len(out) == 8
