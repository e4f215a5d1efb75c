"""Sampling parameters, the per-sequence random draws, and the plain-PyTorch reference sampler.

Semantics are Hugging Face `generate`'s: repetition penalty (over prompt and generated tokens: positive
logits divided, negative multiplied), then greedy argmax unless sampling; when sampling, temperature, then
top-k (0 = off; ties with the k-th value are kept), then top-p (1.0 = off; a token is kept when the mass of
the tokens strictly more likely than it is below top_p: HF's rule, with ties kept together, so the kept set
is a probability threshold that kernels find without sorting). The draw itself is inverse-CDF with ONE
uniform number per sequence and step: token = first id (in vocabulary order) whose cumulative renormalised probability
exceeds u. u comes from a counter-based hash of (seed, sequence index j, step), so a request's output
depends only on its own seed, never on the batch around it, and every backend draws the same u.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        # each message names the parameter and its allowed range (NaN included: it fails every comparison)
        temperature = "a finite number > 0 when sampling"
        _check_number("temperature", self.temperature, temperature)
        _check_number("top_p", self.top_p, TOP_P_RANGE)
        _check_number("repetition_penalty", self.repetition_penalty, REPETITION_PENALTY_RANGE)
        if self.do_sample and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be {temperature}, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be {TOP_P_RANGE}, got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be {REPETITION_PENALTY_RANGE}, got {self.repetition_penalty}")


TOP_P_RANGE = "in (0, 1] (1.0 disables it)"
REPETITION_PENALTY_RANGE = "a finite number > 0 (1.0 disables it)"


def _check_number(name: str, value, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, sequence: int, step: int) -> float:
    """A uniform number in [0, 1) keyed by (seed, sequence index, step); 24 bits, exact in fp32."""
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ sequence) ^ step)
    return (h >> 40) / float(1 << 24)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor. logits (B, V) fp32; seen (B, V) bool: token in prompt/output."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k, top-p as HF's warpers; removed entries become -inf. (B, V) -> (B, V)."""
    z = logits / temperature
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, -math.inf)
    if top_p < 1.0:
        # keep x iff the probability mass of the tokens strictly more likely than x is < top_p. For distinct
        # probabilities this is HF's sorted-cumsum rule; tied tokens are kept or removed together (HF's
        # sort would split a tie at the boundary), which makes the rule a threshold a kernel can find
        # without sorting.
        probs = z.softmax(dim=-1)
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        above = sorted_p.cumsum(dim=-1) - sorted_p  # mass before each sorted entry (ties included)
        first_of_tie = torch.searchsorted(-sorted_p.contiguous(), -sorted_p.contiguous(), right=False)
        mass_strictly_above = above.gather(-1, first_of_tie)
        keep = torch.empty_like(sorted_p, dtype=torch.bool).scatter_(-1, idx, mass_strictly_above < top_p)
        z = z.masked_fill(~keep, -math.inf)
    return z


def sample_reference(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor,
                     seen: torch.Tensor | None) -> torch.Tensor:
    """The reference sampler: logits (B, V) fp32, u (B,) fp32 in [0, 1), seen (B, V) bool or None.
    Returns token ids (B,) int64, -1 for rows whose logits hold NaN or inf."""
    logits = logits.float()
    bad = ~torch.isfinite(logits).all(dim=-1)
    logits = torch.where(bad[:, None], 0.0, logits)  # bad rows return -1; NaN would break top-p's search
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if not params.do_sample:
        tokens = logits.argmax(dim=-1)
    else:
        probs = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(dim=-1)
        cdf = probs.cumsum(dim=-1)
        tokens = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        # never pick a removed token: clamp to the last id with non-zero probability
        last_kept = (probs > 0).cumsum(dim=-1).argmax(dim=-1)
        tokens = torch.minimum(tokens, last_kept)
    return torch.where(bad, torch.full_like(tokens, -1), tokens)
