"""Fused sampler: repetition penalty, greedy or temperature + top-k + top-p + one inverse-CDF draw, without
sorting the vocabulary. Exactly aigc_rt/sampling.py `sample_reference` (its docstring states the rules):

    x = logits, with x_i -> x_i * penalty if x_i < 0 else x_i / penalty for tokens already seen
    greedy: token = first argmax x.   sampling: z = x / temperature (IEEE division, as torch), keys
    key(z) = z's bits as an order-preserving int32, so every threshold below is exact:
      top-k: tau_k = the k-th largest z (ties kept)      = max t with #{key_i >= t} >= k
      top-p: tau   = min t >= tau_k with  sum_{key_i > t, key_i >= tau_k} e_i  <  top_p * sum_{key_i >= tau_k} e_i,
             e_i = exp(z_i - max z): a token is kept iff the mass strictly above it is below top_p
      draw:  token = first i (vocabulary order) with  sum_{j <= i, key_j >= tau} e_j  >  u * sum_{key_j >= tau} e_j,
             clamped to the last kept token with e > 0
    -1 for a row whose logits hold NaN or +-inf.

One program per row streams the row in blocks several times: pass 1 (finiteness, greedy argmax, max z, min
key, and the online softmax sum), then each threshold is found by a multi-pivot search over the key range:
every pass counts (top-k) or weighs (top-p) the tokens above N_PIVOTS evenly spaced keys and narrows the
range to one gap, so 32-bit keys take about 32 / log2(N_PIVOTS + 1) passes; then one cumulative-sum pass draws.
u (one uniform number per row, from the host's (seed, sequence, step) hash) keeps every backend drawing the
same token; results differ from the reference only where u * total lies within float rounding of a CDF
boundary. Tokens stay on the device (no host sync).
Test: tests/test_triton_kernels.py (test_sample*); benchmark: bench/bench_triton.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sampling import SamplingParams, sample_reference
from .utils import check_out, check_tensor, device_fn, pdl_begin, pdl_options, sampling_settings

reference = sample_reference  # the plain-PyTorch fp32 reference (aigc_rt/sampling.py)


@device_fn
def _key(z):
    """Order-preserving int64 key of fp32 z (-0.0 and +0.0 share key 0, as they compare equal)."""
    bits = z.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(z == 0.0, 0, key).to(tl.int64)


@device_fn
def _load_z(logits_ptr, seen_ptr, cols, valid, penalty, temperature, HAS_PENALTY: tl.constexpr,
            SCALE: tl.constexpr):
    """(raw logits, penalised logits [/ temperature when SCALE]) of one block; lanes past V read 0."""
    raw = tl.load(logits_ptr + cols, mask=valid, other=0.0)
    x = raw
    if HAS_PENALTY:
        seen = tl.load(seen_ptr + cols, mask=valid, other=0)
        x = tl.where(seen != 0, tl.where(x < 0, x * penalty, tl.math.div_rn(x, penalty)), x)
    if SCALE:
        x = tl.math.div_rn(x, temperature)
    return raw, x


@device_fn
def _search(logits_ptr, seen_ptr, V, penalty, temperature, z_max, floor, lo, hi, need,
            MASS: tl.constexpr, HAS_PENALTY: tl.constexpr, BLOCK: tl.constexpr, N_PIVOTS: tl.constexpr):
    """Largest key t in [lo, hi] with P(t), given that P(lo) holds and P is non-increasing in t:
        MASS off: P(t) = #{i : key_i >= t} >= need
        MASS on:  P(t) = sum_{i : key_i > t, key_i >= floor} exp(z_i - z_max) >= need
    Each pass tests pivots lo + step * j (j = 1..N_PIVOTS) and keeps the gap where P turns false."""
    j = tl.arange(0, N_PIVOTS).to(tl.int64) + 1
    while lo < hi:
        step = (hi - lo + 1 + N_PIVOTS) // (N_PIVOTS + 1)  # pivots then cover [lo, hi] in gaps of step
        pivots = lo + step * j  # (N_PIVOTS,)
        acc = tl.zeros((N_PIVOTS,), dtype=tl.float32)  # counts are exact in fp32 up to 2^24 > V
        counts = tl.zeros((BLOCK, N_PIVOTS), dtype=tl.int32)  # per lane: summed once, after the loop
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < V
            _, z = _load_z(logits_ptr, seen_ptr, cols, valid, penalty, temperature, HAS_PENALTY, True)
            key = _key(z)
            if MASS:  # a float sum: kept in block order (the reference's rounding, near enough)
                w = tl.where(valid & (key >= floor), tl.exp(z - z_max), 0.0)
                acc += tl.sum(tl.where(key[:, None] > pivots[None, :], w[:, None], 0.0), axis=0)
            else:
                counts += ((key[:, None] >= pivots[None, :]) & valid[:, None]).to(tl.int32)
        if not MASS:
            acc = tl.sum(counts, axis=0).to(tl.float32)
        n_ok = tl.sum(((acc >= need) & (pivots <= hi)).to(tl.int64), axis=0)
        new_lo = lo + step * n_ok
        hi = tl.minimum(hi, new_lo + step - 1)
        lo = new_lo
    return lo


@device_fn
def _kept_mass(logits_ptr, seen_ptr, V, penalty, temperature, z_max, floor,
               HAS_PENALTY: tl.constexpr, BLOCK: tl.constexpr):
    """sum of exp(z_i - z_max) over the tokens with key_i >= floor."""
    total = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < V
        _, z = _load_z(logits_ptr, seen_ptr, cols, valid, penalty, temperature, HAS_PENALTY, True)
        total += tl.sum(tl.where(valid & (_key(z) >= floor), tl.exp(z - z_max), 0.0), axis=0)
    return total


@device_fn
def _draw(logits_ptr, seen_ptr, V, penalty, temperature, z_max, floor, target,
          HAS_PENALTY: tl.constexpr, BLOCK: tl.constexpr):
    """First token whose running mass (kept tokens, vocabulary order) exceeds target; at most the last kept
    token with non-zero mass."""
    carry = 0.0
    first = V
    last = -1
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < V
        _, z = _load_z(logits_ptr, seen_ptr, cols, valid, penalty, temperature, HAS_PENALTY, True)
        e = tl.where(valid & (_key(z) >= floor), tl.exp(z - z_max), 0.0)
        cdf = carry + tl.cumsum(e, axis=0)
        first = tl.minimum(first, tl.min(tl.where(cdf > target, cols, V), axis=0))
        last = tl.maximum(last, tl.max(tl.where(e > 0.0, cols, -1), axis=0))
        carry += tl.sum(e, axis=0)
    return tl.minimum(first, last)


@triton.jit
def _sample_kernel(logits_ptr, seen_ptr, u_ptr, out_ptr, V, logits_stride, seen_stride,
                   temperature, top_k, top_p, penalty,
                   HAS_PENALTY: tl.constexpr, DO_SAMPLE: tl.constexpr, DO_TOP_K: tl.constexpr,
                   DO_TOP_P: tl.constexpr, BLOCK: tl.constexpr, N_PIVOTS: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_stride
    seen_ptr += row * seen_stride
    # pass 1: finiteness; greedy: first argmax; sampling: max z, min key, online sum of exp(z - max z).
    # Per-lane running values (one reduction after the loop) where the order of the work cannot change a
    # result: counts, maxima, minima and the first argmax; the sum stays a per-block reduction.
    lanes = tl.arange(0, BLOCK)
    n_bad = tl.zeros((BLOCK,), dtype=tl.int32)
    best = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    arg = tl.full((BLOCK,), V, dtype=tl.int32)  # the first column holding each lane's best (V: none yet)
    z_max = float("-inf")
    z_sum = 0.0
    key_min = tl.full((BLOCK,), 0x7FFFFFFF, dtype=tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + lanes
        valid = cols < V
        raw, x = _load_z(logits_ptr, seen_ptr, cols, valid, penalty, temperature, HAS_PENALTY, DO_SAMPLE)
        n_bad += ((raw != raw) | (tl.abs(raw) == float("inf"))).to(tl.int32)
        x = tl.where(valid, x, float("-inf"))
        if DO_SAMPLE:
            block_max = tl.max(x, axis=0)
            new_max = tl.maximum(z_max, block_max)
            z_sum = z_sum * tl.exp(z_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            z_max = new_max
            key_min = tl.minimum(key_min, tl.where(valid, _key(x), 0x7FFFFFFF))
        else:
            better = x > best  # strict: a lane keeps its earlier column on a tie
            arg = tl.where(better, cols, arg)
            best = tl.where(better, x, best)
    n_bad = tl.sum(n_bad, axis=0)
    key_min = tl.min(key_min, axis=0)
    top = tl.max(best, axis=0)
    token = tl.min(tl.where(best == top, arg, V), axis=0)  # the first column over all lanes
    token = tl.where(token < V, token, 0)  # every value -inf: column 0, as torch.argmax
    if DO_SAMPLE:
        floor = key_min  # every token kept
        total = z_sum
        if DO_TOP_K:
            floor = _search(logits_ptr, seen_ptr, V, penalty, temperature, z_max, floor, key_min, _key(z_max),
                            top_k, False, HAS_PENALTY, BLOCK, N_PIVOTS)
            total = _kept_mass(logits_ptr, seen_ptr, V, penalty, temperature, z_max, floor, HAS_PENALTY, BLOCK)
        if DO_TOP_P:
            # P(t) = "mass strictly above t >= top_p * total" holds at floor - 1 (the whole kept mass);
            # the smallest key where it fails is the new floor
            floor = 1 + _search(logits_ptr, seen_ptr, V, penalty, temperature, z_max, floor, floor - 1,
                                _key(z_max), top_p * total, True, HAS_PENALTY, BLOCK, N_PIVOTS)
            total = _kept_mass(logits_ptr, seen_ptr, V, penalty, temperature, z_max, floor, HAS_PENALTY, BLOCK)
        u = tl.load(u_ptr + row)
        token = _draw(logits_ptr, seen_ptr, V, penalty, temperature, z_max, floor, u * total, HAS_PENALTY, BLOCK)
    tl.store(out_ptr + row, tl.where(n_bad > 0, -1, token).to(tl.int64))


def sample(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor, seen: torch.Tensor | None, *,
           out=None) -> torch.Tensor:
    """logits (B, V) fp32, u (B,) fp32 in [0, 1) (ignored when greedy), seen (B, V) bool or None ->
    token ids (B,) int64 on the device, -1 for rows with NaN/inf logits."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    check_tensor("logits", logits, 2, (torch.float32,), None, last_contiguous=True)
    dev = logits.device
    B, V = logits.shape
    if V == 0 or V >= 1 << 24:
        raise ValueError(f"the vocabulary must have between 1 and 2^24 - 1 entries, got {V}")
    check_tensor("u", u, 1, (torch.float32,), dev)
    if u.shape[0] != B or not u.is_contiguous():
        raise ValueError(f"u must be a contiguous ({B},) tensor, got {tuple(u.shape)}")
    penalise = seen is not None and params.repetition_penalty != 1.0
    if seen is not None:
        check_tensor("seen", seen, 2, (torch.bool,), dev, last_contiguous=True)
        if seen.shape != logits.shape:
            raise ValueError(f"seen has shape {tuple(seen.shape)}, logits {tuple(logits.shape)}; they must match")
    seen_u8 = seen.view(torch.uint8) if penalise else logits  # a dummy pointer when there is no penalty
    tokens = check_out(out, (B,), torch.int64, dev)
    if B == 0:
        return tokens
    s = sampling_settings(V, params.do_sample)
    _sample_kernel[(B,)](
        logits, seen_u8, u, tokens, V, logits.stride(0), seen_u8.stride(0),
        float(params.temperature), float(params.top_k), float(params.top_p), float(params.repetition_penalty),
        HAS_PENALTY=penalise, DO_SAMPLE=params.do_sample, DO_TOP_K=params.do_sample and 0 < params.top_k < V,
        DO_TOP_P=params.do_sample and params.top_p < 1.0, **s, **pdl_options(dev))
    return tokens
