"""C++ sampler (csrc/cpu/sampling.cpp) vs aigc_rt.sampling.sample_reference, token for token, once per ISA.

Both draw by inverse CDF with the same uniform u, but sum fp32 probabilities in different orders and with
different exp implementations, so they may disagree when u lies within rounding of a CDF boundary. A mismatch
is accepted only when u is within EPS of a boundary of the reference CDF between the two tokens (and the token
is one the reference kept); such cases must stay rare (at most 1 in 500 rows).
"""
import functools
import itertools

import pytest
import torch

from aigc_rt import _C
from aigc_rt.backends import get_backend
from aigc_rt.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample_reference

EPS = 1e-4  # |u - reference CDF boundary| below which a different token is accepted (fp32 sums of 50k terms)


def run(logits, params, u, seen=None, **kw):
    return _C.sample(logits, params.do_sample, params.temperature, params.top_k, params.top_p,
                     params.repetition_penalty, u, seen, **kw)


def reference_cdf(logits, params, seen):
    """The reference's renormalised probabilities and CDF (fp64) for rows of logits."""
    z = apply_repetition_penalty(logits, seen, params.repetition_penalty) if seen is not None else logits
    probs = filter_logits(z, params.temperature, params.top_k, params.top_p).softmax(dim=-1).double()
    cdf = probs.cumsum(dim=-1)
    return probs, cdf / cdf[:, -1:]


def mismatches_near_boundaries(logits, params, u, seen, got, want):
    """Rows where got != want; asserts each is a rounding case (see the module docstring). Returns their count."""
    rows = (got != want).nonzero().flatten()
    if len(rows) == 0:
        return 0
    probs, cdf = reference_cdf(logits[rows], params, None if seen is None else seen[rows])
    for i, r in enumerate(rows.tolist()):
        g, w = got[r].item(), want[r].item()
        assert g >= 0 and probs[i, g] > 0, f"row {r}: sampled token {g}, which the reference removed"
        lo, hi = min(g, w), max(g, w)
        gap = (cdf[i, lo:hi] - u[r].item()).abs().min().item()
        assert gap < EPS, (f"row {r} ({params}): got {g}, reference {w}, but u={u[r].item():.7f} is {gap:.2e} "
                           f"from the nearest CDF boundary between them")
    return len(rows)


def logit_rows(kind, B, V, seed):
    x = torch.randn(B, V, generator=torch.Generator().manual_seed(seed))
    return {"normal": x * 3, "ties": (x * 2).round(), "peaked": x * 10, "flat": x * 0.1}[kind]


# (temperature, top_k, top_p, repetition_penalty); the 50,257-token cases take a subset (the reference sorts)
GRID = list(itertools.product([0.7, 1.0, 1.3], [0, 1, 5, 50], [1.0, 0.9, 0.5], [1.0, 1.3]))
GRID_LARGE = list(itertools.product([0.7, 1.3], [0, 50], [1.0, 0.9, 0.5], [1.0, 1.3]))
CASES = {17: (["normal", "ties"], GRID), 1003: (["normal", "ties", "peaked", "flat"], GRID),
         50257: (["normal", "flat"], GRID_LARGE)}


@functools.lru_cache(maxsize=None)
def reference_cases(V):
    """[(logits, params, u, seen, reference tokens)] for every kind of logits and GRID entry; shared by the ISAs."""
    kinds, grid = CASES[V]
    B = 4 if V > 10000 else 16
    gen = torch.Generator().manual_seed(V)
    cases = []
    for kind in kinds:
        logits = logit_rows(kind, B, V, seed=V + len(kind))
        for temperature, top_k, top_p, penalty in grid:
            params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=penalty)
            u = torch.rand(B, generator=gen)
            seen = torch.rand(B, V, generator=gen) < 0.05
            cases.append((logits, params, u, seen, sample_reference(logits, params, u, seen)))
    return cases


@pytest.mark.parametrize("V", sorted(CASES))
def test_sampling_matches_reference_token_for_token(isa, V):
    """Every (temperature, top_k, top_p, repetition_penalty) of the grid on rows of each kind of logits."""
    rows = accepted = 0
    for logits, params, u, seen, want in reference_cases(V):
        got = run(logits, params, u, seen)
        accepted += mismatches_near_boundaries(logits, params, u, seen, got, want)
        rows += len(u)
    assert accepted <= rows / 500, f"{accepted} of {rows} rows differ from the reference (near CDF boundaries)"


@pytest.mark.parametrize("V", [1, 3, 17, 1000, 1023])
def test_greedy_is_the_first_argmax(isa, V):
    logits = logit_rows("ties", 8, V, seed=V)  # integer-valued: many rows tie at their maximum
    for penalty in (1.0, 1.5, 0.6):
        params = SamplingParams(repetition_penalty=penalty)
        seen = torch.rand(8, V, generator=torch.Generator().manual_seed(1)) < 0.3
        want = sample_reference(logits, params, torch.zeros(8), seen)
        assert torch.equal(run(logits, params, torch.zeros(8), seen), want), penalty
    assert torch.equal(run(logits, SamplingParams(), torch.zeros(8)), logits.argmax(dim=-1))


def test_non_finite_rows_give_minus_one(isa):
    logits = logit_rows("normal", 6, 1003, seed=2)
    logits[1, 0], logits[2, 1002], logits[3, 500], logits[4, 17] = float("nan"), float("inf"), -float("inf"), 3e38
    u = torch.full((6,), 0.5)
    for params in (SamplingParams(), SamplingParams(do_sample=True, top_k=5, top_p=0.9)):
        want = sample_reference(logits, params, u, None)
        got = run(logits, params, u)
        assert got[1:4].tolist() == [-1, -1, -1] and torch.equal(got, want), params


@pytest.mark.parametrize("V", [5, 17, 1003])
def test_disabled_filters_and_edge_draws(isa, V):
    """top_k >= V and top_p = 1 leave the plain distribution; u = 0 picks the first token with non-zero
    probability; u just below 1 the last kept one; top_k = 1 is greedy."""
    logits = logit_rows("normal", 8, V, seed=V)
    u = torch.rand(8, generator=torch.Generator().manual_seed(V))
    plain = run(logits, SamplingParams(do_sample=True, temperature=0.8), u)
    for top_k in (V, V + 10):
        assert torch.equal(run(logits, SamplingParams(do_sample=True, temperature=0.8, top_k=top_k, top_p=1.0), u),
                           plain)
    for edge in (0.0, 1.0 - 2 ** -24):
        ue = torch.full((8,), edge)
        for params in (SamplingParams(do_sample=True, top_k=3), SamplingParams(do_sample=True, top_p=0.6)):
            assert torch.equal(run(logits, params, ue), sample_reference(logits, params, ue, None)), (edge, params)
    assert torch.equal(run(logits, SamplingParams(do_sample=True, top_k=1), u), logits.argmax(dim=-1))


def test_out_parameter_and_backend(isa):
    logits, u = logit_rows("normal", 3, 1003, seed=4), torch.tensor([0.1, 0.5, 0.9])
    params = SamplingParams(do_sample=True, top_k=50, top_p=0.9, temperature=0.7)
    out = torch.full((3,), -7, dtype=torch.int64)
    assert run(logits, params, u, out=out) is out
    assert torch.equal(out, sample_reference(logits, params, u, None))
    assert torch.equal(get_backend("cpu").sample(logits, params, u, None), out)


def test_bad_arguments_raise_value_error():
    logits, u, p = torch.randn(2, 10), torch.tensor([0.1, 0.2]), dict(do_sample=True, temperature=1.0, top_k=0,
                                                                       top_p=1.0, repetition_penalty=1.0)

    def call(**change):
        a = dict(logits=logits, u=u, seen=None) | p | change
        return _C.sample(a.pop("logits"), a.pop("do_sample"), a.pop("temperature"), a.pop("top_k"), a.pop("top_p"),
                         a.pop("repetition_penalty"), a.pop("u"), a.pop("seen"), **a)

    for change, message in [
        (dict(temperature=0.0), "temperature must be a finite number > 0"), (dict(temperature=float("inf")), "temp"),
        (dict(top_p=0.0), "top_p must be in"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=-1), "top_k must be >= 0"), (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(u=torch.tensor([0.1, 1.0])), r"u\[1\] = 1 is outside \[0, 1\)"),
        (dict(u=torch.tensor([float("nan"), 0.1])), r"u\[0\] = nan"),
        (dict(u=torch.tensor([0.1])), "u must be a contiguous CPU float32 tensor of shape"),
        (dict(u=u.double()), "u must be"), (dict(logits=logits.double()), "logits must be a CPU float32"),
        (dict(logits=logits[0]), "logits must be"), (dict(logits=torch.randn(10, 2).t()), "contiguous in its last"),
        (dict(seen=torch.zeros(2, 10)), "seen must be a CPU bool"), (dict(seen=torch.zeros(2, 9, dtype=torch.bool)),
                                                                     "seen must be"),
        (dict(out=torch.empty(2, dtype=torch.int32)), "out must be a contiguous CPU int64"),
    ]:
        with pytest.raises(ValueError, match=message):
            call(**change)
    # greedy ignores u and temperature
    assert call(do_sample=False, temperature=0.0, u=torch.tensor([5.0, -1.0])).tolist() == logits.argmax(-1).tolist()
