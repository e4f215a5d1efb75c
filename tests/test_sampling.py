"""Sampling: HF semantics of each filter, and the empirical distribution of every backend's sampler."""
from __future__ import annotations

import math

import pytest
import torch

from aigc_rt.backends import get_backend
from aigc_rt.sampling import SamplingParams, apply_repetition_penalty, filter_logits, uniform

BACKENDS = ["torch", "cpu"]


def test_uniform_is_keyed_and_uniform():
    assert uniform(7, 0, 3) == uniform(7, 0, 3)
    assert len({uniform(7, j, s) for j in range(4) for s in range(50)}) == 200
    u = torch.tensor([uniform(123, 0, s) for s in range(20000)])
    assert 0 <= u.min() and u.max() < 1
    hist = torch.histc(u, bins=10, min=0, max=1) / len(u)
    assert (hist - 0.1).abs().max() < 0.01, hist


@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 0.7), (5, 1.0, 1.0), (0, 0.8, 1.3), (50, 0.9, 0.7),
                                                     (1, 1.0, 1.0), (3, 0.3, 2.0)])
def test_filters_match_hf_warpers(top_k, top_p, temperature):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = torch.randn(4, 1003, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, :10] = 2.5  # ties
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    got = filter_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_top_p_keeps_ties_together():
    """Probabilities [0.3, 0.3, 0.3, 0.1]: with top_p=0.5, HF's sort keeps two of the three tied tokens; our
    rule (mass strictly above < top_p) keeps all three, and never the 0.1 one."""
    logits = torch.tensor([[0.3, 0.3, 0.3, 0.1]]).log()
    kept = ~torch.isinf(filter_logits(logits, 1.0, 0, 0.5))
    assert kept.tolist() == [[True, True, True, False]]
    kept = ~torch.isinf(filter_logits(logits, 1.0, 0, 0.95))
    assert kept.tolist() == [[True, True, True, True]]


def test_repetition_penalty_matches_hf():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    logits = torch.randn(3, 517, generator=torch.Generator().manual_seed(1)) * 4
    input_ids = torch.randint(0, 517, (3, 40), generator=torch.Generator().manual_seed(2))
    seen = torch.zeros(3, 517, dtype=torch.bool).scatter_(1, input_ids, True)
    for penalty in (0.5, 1.3, 2.0):
        want = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
        assert torch.equal(apply_repetition_penalty(logits, seen, penalty), want)


def _target_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Independent fp64 statement of the target distribution for one row: temperature, then the top_k
    largest (ties with the k-th kept), then the smallest head of the sorted distribution whose mass
    exceeds top_p (HF's rule), renormalised."""
    z = logits.double() / p.temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if p.top_k:
        keep &= z >= z.sort(descending=True).values[p.top_k - 1]
    probs = torch.where(keep, z, -math.inf).softmax(-1)
    if p.top_p < 1:
        order = probs.argsort(descending=True)
        mass_before = probs[order].cumsum(0) - probs[order]
        head = order[mass_before < p.top_p]
        keep = torch.zeros_like(keep)
        keep[head] = True
        probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("params", [
    SamplingParams(do_sample=True, temperature=1.0),
    SamplingParams(do_sample=True, temperature=0.7, top_k=5),
    SamplingParams(do_sample=True, temperature=1.5, top_p=0.6),
    SamplingParams(do_sample=True, temperature=0.9, top_k=8, top_p=0.9),
], ids=["plain", "top_k", "top_p", "top_k+top_p"])
def test_empirical_distribution_matches_target(backend, params):
    """20,000 draws from fixed logits (V=37): the empirical frequencies match the renormalised target
    within 0.015 absolute (about 4 standard deviations at p=0.5), and filtered-out tokens never appear."""
    be = get_backend(backend, "cpu")
    logits = torch.randn(37, generator=torch.Generator().manual_seed(5)) * 2
    n = 20000
    u = torch.tensor([uniform(99, 0, s) for s in range(n)])
    tokens = be.sample(logits.expand(n, -1).contiguous(), params, u, None)
    freq = torch.bincount(tokens, minlength=37).double() / n
    target = _target_probs(logits, params)
    assert freq[target == 0].sum() == 0, "a filtered-out token was sampled"
    err = (freq - target).abs().max().item()
    assert err < 0.015, f"{backend}: max |empirical - target| = {err:.4f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_and_non_finite_rows(backend):
    be = get_backend(backend, "cpu")
    logits = torch.randn(4, 1023, generator=torch.Generator().manual_seed(3))
    logits[1, 0] = float("nan")
    logits[2, 7] = float("inf")
    logits[3, 5] = float("-inf")
    tokens = be.sample(logits, SamplingParams(), torch.zeros(4), None)
    assert tokens[0].item() == logits[0].argmax().item()
    assert tokens[1].item() == -1 and tokens[2].item() == -1 and tokens[3].item() == -1


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_rows_when_sampling(backend):
    """-1 for NaN/inf rows under every filter (top-p's tie search once indexed past a NaN row and crashed)."""
    logits = torch.randn(3, 517, generator=torch.Generator().manual_seed(4))
    logits[0, 3], logits[1, 9] = float("nan"), float("inf")
    for params in (SamplingParams(do_sample=True, top_p=0.9), SamplingParams(do_sample=True, top_k=5, top_p=0.5),
                   SamplingParams(do_sample=True, temperature=0.7)):
        tokens = get_backend(backend, "cpu").sample(logits, params, torch.full((3,), 0.5), None)
        assert tokens[:2].tolist() == [-1, -1] and 0 <= tokens[2] < 517, (params, tokens)


@pytest.mark.parametrize("bad,message", [
    (dict(do_sample=True, temperature=0.0), "temperature"), (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-2.0), "repetition_penalty"),
])
def test_invalid_sampling_params(bad, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)
