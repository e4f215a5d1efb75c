"""TextModel.perplexity: the sliding-window scheme against a reference that scores each token on its own (one
Hugging Face forward per token, over exactly the context its window gives it), on the torch and cpu backends;
the LSTM against its torch module; bad arguments."""
from __future__ import annotations

import pytest
import torch

import aigc_rt

TEXT = ("Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex. "
        "落霞与孤鹜齐飞，秋水共长天一色。 Flat is better than nested. Sparse is better than dense.")


@pytest.fixture(scope="module", params=["torch", "cpu"])
def model(request, rt_odd):
    return aigc_rt.load(rt_odd[0], backend=request.param)


def reference_nll(hf, ids: list[int], window: int, stride: int) -> float:
    """Token t (t >= 1) is scored by the first window k (inputs ids[k * stride : k * stride + window], cut at the
    last token) that predicts it, from the context ids[k * stride : t]."""
    nll = 0.0
    for t in range(1, len(ids)):
        k = max(0, (t - window + stride - 1) // stride)  # the first k with k * stride + window >= t
        with torch.no_grad():
            logits = hf(torch.tensor([ids[k * stride: t]])).logits[0, -1]
        nll -= torch.log_softmax(logits.double(), -1)[ids[t]].item()
    return nll


@pytest.mark.parametrize("window,stride", [(None, None), (64, 24), (16, 16), (16, 5), (1, 1)])
def test_perplexity_matches_a_token_by_token_reference(model, rt_odd, window, stride):
    """fp32: the summed NLL within 1e-5 relative (+ 1e-4) of the reference's; the text is ~4 contexts long."""
    hf, n_ctx = rt_odd[1], rt_odd[1].config.n_positions
    ids = model.tokenizer.encode(TEXT * 6)
    assert len(ids) > 3 * n_ctx
    got = model.perplexity(TEXT * 6, window=window, stride=stride)
    w = n_ctx if window is None else window
    want = reference_nll(hf, ids, w, w if stride is None else stride)
    assert got.tokens == len(ids) - 1
    err = abs(got.nll - want)
    assert err <= 1e-4 + 1e-5 * want, f"window {window} stride {stride}: NLL {got.nll:.6f} vs {want:.6f}"
    assert got.perplexity == pytest.approx(torch.tensor(want / got.tokens).exp().item(), rel=1e-5)


def test_token_ids_and_a_short_text(model, rt_odd):
    ids = model.tokenizer.encode("Beautiful is better")
    a, b = model.perplexity(ids), model.perplexity(torch.tensor(ids))
    assert a == b and a.tokens == len(ids) - 1
    assert a.nll == pytest.approx(reference_nll(rt_odd[1], ids, len(ids), len(ids)), rel=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(text="x"), "at least 2 tokens"), (dict(text=[1, 5000]), r"token id 5000 is outside the vocabulary"),
    (dict(window=0), r"window must be an int in \[1, 64\]"), (dict(window=65), r"window must be an int in \[1, 64\]"),
    (dict(window=8, stride=9), r"stride must be an int in \[1, window = 8\], got 9"),
    (dict(stride=0), r"stride must be an int in \[1, window"), (dict(window=2.5), "window must be an int"),
])
def test_bad_arguments(model, kwargs, message):
    kwargs = {"text": "Beautiful is better than ugly.", **kwargs}
    with pytest.raises(ValueError, match=message):
        model.perplexity(kwargs.pop("text"), **kwargs)
