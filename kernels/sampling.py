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

Thresholds are found by a multi-pivot search over the key range: every pass counts (top-k) or weighs (top-p)
the tokens above N_PIVOTS evenly spaced keys and narrows the range to one gap, so 32-bit keys take about
32 / log2(N_PIVOTS + 1) passes. Two ways to run it:
- split (greedy; temperature alone; top-k of up to MAX_CANDIDATES / chunks, with or without top-p; top-p
  alone): the row is cut into chunks of CHUNK logits, one program each (_sample_chunk_kernel), which holds its
  chunk in registers and writes its max z, sum of exp(z - its max), first argmax, smallest key and, with a
  filter, its candidates: the values at or above its own k-th largest key (k = top_k; top-p alone,
  TOP_P_CANDIDATES), compacted in column order, and that key if some value of the chunk is below it (its cut).
  Every token of the row's top k is a candidate, as the row's k-th largest key is at least any chunk's. Then one
  program per row (_sample_merge_kernel; without candidates, the row's last chunk program to finish, counted in
  utils.new_counters() slots: no second launch) searches the thresholds over the candidates in registers and draws with
  a running sum over them in column order; without filters it finds the chunk whose running mass passes
  u * total and the column inside it. Top-p alone is exact over the candidates at or above the highest cut
  when they hold top_p of the row's mass (every other token then has that much above it): peaked rows. The
  row goes to the streaming way, decided on the device, when a chunk has more candidates than its CAP slots
  (ties at its threshold) or, top-p alone, when the candidates hold less than top_p (flat rows).
- streaming (large k, a row of one chunk; and the split way's fallback): one program per row streams the row
  in blocks several times: pass 1 (finiteness, greedy argmax, max z, min key, the online softmax sum), a pass
  per search step, then one cumulative-sum pass draws.
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
from .utils import (arrive, check_out, check_tensor, check_vector, checked_counters, device_fn, pdl_begin, pdl_options,
                    sampling_settings)

reference = sample_reference  # the plain-PyTorch fp32 reference (aigc_rt/sampling.py)
MAX_CANDIDATES = 4096  # candidate slots the merge may hold in registers (chunks x CAP)
TOP_P_CANDIDATES = 64  # top-p alone: each chunk's largest values the merge tries first (see _draw_candidates)
# the split path in one launch where the merge is light (greedy, temperature alone: no candidates): each row's last
# chunk program to finish merges the row (a counter per row, as the fused sub-layers count their partials) instead
# of a second launch. With candidates the merge holds up to MAX_CANDIDATES values and searches them: in the chunks'
# kernel that went from 76 to 200 B spilled a thread at sm_90 (every chunk program pays), so they keep two launches
ONE_LAUNCH = True
NO_CUT = tl.constexpr(-(1 << 32))  # a cut below every key: all of the chunk's values are candidates
STATS_I = tl.constexpr(5)  # int64 results per chunk: first argmax, NaN/inf count, candidates, min key, cut


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
def _pivots(lo, hi, N_PIVOTS: tl.constexpr):
    """A search pass's N_PIVOTS pivots lo + step * j (j = 1..N_PIVOTS), evenly covering [lo, hi]: (step, pivots)."""
    step = (hi - lo + 1 + N_PIVOTS) // (N_PIVOTS + 1)
    return step, lo + step * (tl.arange(0, N_PIVOTS).to(tl.int64) + 1)


@device_fn
def _narrow(lo, hi, step, pivots, acc, need):
    """The gap of [lo, hi] where P turns false, given acc (N_PIVOTS,), P's sum at each pivot: (lo, hi)."""
    new_lo = lo + step * tl.sum(((acc >= need) & (pivots <= hi)).to(tl.int64), axis=0)
    return new_lo, tl.minimum(hi, new_lo + step - 1)


@device_fn
def _search(logits_ptr, seen_ptr, V, penalty, temperature, z_max, floor, lo, hi, need,
            MASS: tl.constexpr, HAS_PENALTY: tl.constexpr, BLOCK: tl.constexpr, N_PIVOTS: tl.constexpr):
    """Largest key t in [lo, hi] with P(t), given that P(lo) holds and P is non-increasing in t:
        MASS off: P(t) = #{i : key_i >= t} >= need
        MASS on:  P(t) = sum_{i : key_i > t, key_i >= floor} exp(z_i - z_max) >= need
    Each pass tests pivots lo + step * j (j = 1..N_PIVOTS) and keeps the gap where P turns false."""
    while lo < hi:
        step, pivots = _pivots(lo, hi, N_PIVOTS)  # (N_PIVOTS,)
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
        lo, hi = _narrow(lo, hi, step, pivots, acc, need)
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


@device_fn
def _filter_and_draw(logits_ptr, seen_ptr, V, penalty, temperature, top_k, top_p, u, z_max, z_sum, key_min,
                     HAS_PENALTY: tl.constexpr, DO_TOP_K: tl.constexpr, DO_TOP_P: tl.constexpr,
                     BLOCK: tl.constexpr, N_PIVOTS: tl.constexpr):
    """Top-k, top-p and the draw by streaming one row (several passes), given its max z, the sum of
    exp(z - max z) over it and its smallest key."""
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
    return _draw(logits_ptr, seen_ptr, V, penalty, temperature, z_max, floor, u * total, HAS_PENALTY, BLOCK)


@device_fn
def _search_held(key, w, lo, hi, need, MASS: tl.constexpr, N_PIVOTS: tl.constexpr):
    """_search over values held in registers, key and w (n,): the largest t in [lo, hi] with P(t), given P(lo):
        MASS off: P(t) = sum_{key_i >= t} w_i >= need   (w = 1 for the values counted, 0 for the others)
        MASS on:  P(t) = sum_{key_i > t} w_i >= need"""
    while lo < hi:
        step, pivots = _pivots(lo, hi, N_PIVOTS)  # (N_PIVOTS,)
        if MASS:
            above = key[:, None] > pivots[None, :]
        else:
            above = key[:, None] >= pivots[None, :]
        lo, hi = _narrow(lo, hi, step, pivots, tl.sum(tl.where(above, w[:, None], 0.0), axis=0), need)
    return lo


@triton.jit
def _sample_kernel(logits_ptr, seen_ptr, u_ptr, out_ptr, pos_ptr, V, logits_stride, seen_stride,
                   temperature, top_k, top_p, penalty,
                   HAS_PENALTY: tl.constexpr, DO_SAMPLE: tl.constexpr, DO_TOP_K: tl.constexpr,
                   DO_TOP_P: tl.constexpr, BLOCK: tl.constexpr, N_PIVOTS: tl.constexpr, PDL: tl.constexpr,
                   ADVANCE: tl.constexpr = False, MARK_SEEN: tl.constexpr = False):
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
        token = _filter_and_draw(logits_ptr, seen_ptr, V, penalty, temperature, top_k, top_p, tl.load(u_ptr + row),
                                 z_max, z_sum, key_min, HAS_PENALTY, DO_TOP_K, DO_TOP_P, BLOCK, N_PIVOTS)
    _finish(out_ptr, pos_ptr, seen_ptr, row, token, n_bad, ADVANCE, MARK_SEEN)


# -- split rows: many programs per row, then one merge per row ---------------------------------------------
@triton.jit
def _sample_chunk_kernel(logits_ptr, seen_ptr, stats_f_ptr, stats_i_ptr, cand_z_ptr, cand_i_ptr, V, logits_stride,
                         seen_stride, n_chunks, temperature, top_k, penalty, HAS_PENALTY: tl.constexpr,
                         DO_SAMPLE: tl.constexpr, DO_TOP_K: tl.constexpr, CHUNK: tl.constexpr, CAP: tl.constexpr,
                         HELD_PIVOTS: tl.constexpr, PDL: tl.constexpr, u_ptr, out_ptr, pos_ptr, count_ptr, top_p,
                         MERGE: tl.constexpr = False, MERGE_TOP_K: tl.constexpr = False,
                         DO_TOP_P: tl.constexpr = False, CANDIDATES: tl.constexpr = False,
                         N_CHUNKS: tl.constexpr = 1, BLOCK: tl.constexpr = 16, N_PIVOTS: tl.constexpr = 16,
                         ADVANCE: tl.constexpr = False, MARK_SEEN: tl.constexpr = False):
    """One chunk of CHUNK logits of one row, held in registers: its count of NaN/inf, max z, sum of
    exp(z - its max), smallest key, first argmax, and (DO_TOP_K) its candidates: the values at or above its own
    k-th largest key (every token of the row's top k is one), compacted in column order into CAP slots, and its
    cut: that key if a value of the chunk is below it (every value of the chunk at or above the cut is a
    candidate), else NO_CUT. MERGE (ONE_LAUNCH): the row's last chunk to finish (its counter, count[row]) then
    merges the row (_merge_row, with the merge's flags: MERGE_TOP_K is its DO_TOP_K, where DO_TOP_K here says
    whether the chunks keep candidates, top-p alone too), the work of _sample_merge_kernel without its launch."""
    pdl_begin(PDL)
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = cols < V
    raw, z = _load_z(logits_ptr + row * logits_stride, seen_ptr + row * seen_stride, cols, valid, penalty,
                     temperature, HAS_PENALTY, DO_SAMPLE)
    n_bad = tl.sum(((raw != raw) | (tl.abs(raw) == float("inf"))).to(tl.int32), axis=0)
    x = tl.where(valid, z, float("-inf"))
    z_max = tl.max(x, axis=0)
    arg = tl.min(tl.where(valid & (x == z_max), cols, V), axis=0)
    key = _key(x)
    key_min = tl.min(tl.where(valid, key, 0x7FFFFFFF), axis=0)
    z_sum = 0.0
    count = 0
    cut = NO_CUT
    if DO_SAMPLE:
        z_sum = tl.sum(tl.where(valid, tl.exp(x - z_max), 0.0), axis=0)
        if DO_TOP_K:
            counted = valid.to(tl.float32)
            floor = key_min  # a chunk of at most k values keeps them all
            if tl.sum(counted, axis=0) > top_k:
                floor = _search_held(key, counted, key_min, _key(z_max), top_k, False, HELD_PIVOTS)
            kept = valid & (key >= floor)
            slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
            count = tl.sum(kept.to(tl.int32), axis=0)  # > CAP (ties): the merge takes the streaming path
            if tl.sum((valid & (key < floor)).to(tl.int32), axis=0) > 0:
                cut = floor
            at = (row * n_chunks + chunk) * CAP + slot
            tl.store(cand_z_ptr + at, x, mask=kept & (slot < CAP))
            tl.store(cand_i_ptr + at, cols, mask=kept & (slot < CAP))
    stats = (row * n_chunks + chunk) * 2
    tl.store(stats_f_ptr + stats, z_max)
    tl.store(stats_f_ptr + stats + 1, z_sum)
    stats = (row * n_chunks + chunk) * STATS_I
    tl.store(stats_i_ptr + stats, arg)  # (stores widen to int64)
    tl.store(stats_i_ptr + stats + 1, n_bad)
    tl.store(stats_i_ptr + stats + 2, count)
    tl.store(stats_i_ptr + stats + 3, key_min)
    tl.store(stats_i_ptr + stats + 4, cut)
    if MERGE:
        if arrive(count_ptr + row, n_chunks):
            _merge_row(row, logits_ptr, seen_ptr, u_ptr, out_ptr, pos_ptr, stats_f_ptr, stats_i_ptr, cand_z_ptr,
                       cand_i_ptr, V, logits_stride, seen_stride, n_chunks, temperature, top_k, top_p, penalty,
                       HAS_PENALTY, DO_SAMPLE, MERGE_TOP_K, DO_TOP_P, CANDIDATES, CHUNK, CAP, N_CHUNKS, BLOCK, N_PIVOTS, HELD_PIVOTS, ADVANCE, MARK_SEEN)


@triton.jit
def _sample_merge_kernel(logits_ptr, seen_ptr, u_ptr, out_ptr, pos_ptr, stats_f_ptr, stats_i_ptr, cand_z_ptr,
                         cand_i_ptr, V, logits_stride, seen_stride, n_chunks, temperature, top_k, top_p, penalty,
                         HAS_PENALTY: tl.constexpr, DO_SAMPLE: tl.constexpr, DO_TOP_K: tl.constexpr,
                         DO_TOP_P: tl.constexpr, CANDIDATES: tl.constexpr, CHUNK: tl.constexpr, CAP: tl.constexpr,
                         N_CHUNKS: tl.constexpr, BLOCK: tl.constexpr, N_PIVOTS: tl.constexpr,
                         HELD_PIVOTS: tl.constexpr, PDL: tl.constexpr, ADVANCE: tl.constexpr = False,
                         MARK_SEEN: tl.constexpr = False):
    """The merge of a row's chunks as a launch of its own, one program per row (_merge_row)."""
    pdl_begin(PDL)
    _merge_row(tl.program_id(0).to(tl.int64), logits_ptr, seen_ptr, u_ptr, out_ptr, pos_ptr, stats_f_ptr, stats_i_ptr,
               cand_z_ptr, cand_i_ptr, V, logits_stride, seen_stride, n_chunks, temperature, top_k, top_p, penalty,
               HAS_PENALTY, DO_SAMPLE, DO_TOP_K, DO_TOP_P, CANDIDATES, CHUNK, CAP, N_CHUNKS, BLOCK, N_PIVOTS,
               HELD_PIVOTS, ADVANCE, MARK_SEEN)


@device_fn
def _merge_row(row, logits_ptr, seen_ptr, u_ptr, out_ptr, pos_ptr, stats_f_ptr, stats_i_ptr, cand_z_ptr, cand_i_ptr,
               V, logits_stride, seen_stride, n_chunks, temperature, top_k, top_p, penalty,
               HAS_PENALTY: tl.constexpr, DO_SAMPLE: tl.constexpr, DO_TOP_K: tl.constexpr, DO_TOP_P: tl.constexpr,
               CANDIDATES: tl.constexpr, CHUNK: tl.constexpr, CAP: tl.constexpr, N_CHUNKS: tl.constexpr,
               BLOCK: tl.constexpr, N_PIVOTS: tl.constexpr, HELD_PIVOTS: tl.constexpr, ADVANCE: tl.constexpr,
               MARK_SEEN: tl.constexpr):
    """Row `row` from its chunks' results: greedy, the first argmax of the first chunk holding the max; sampling
    with top-k or top-p (CANDIDATES), the thresholds and the draw over the chunks' candidates (in column order,
    so the draw's running sum is the reference's), or by streaming the row if the candidates may miss a token
    that is kept (a chunk had more candidates than CAP; top-p alone: they hold less than top_p of the mass);
    sampling without filters, the chunk whose running mass passes u * total, then the column within it. The
    chunks' results were written by other programs (in one launch, ONE_LAUNCH, of this one): read from L2 (.cg)."""
    chunks = tl.arange(0, N_CHUNKS)
    in_row = chunks < n_chunks
    at = row * n_chunks + chunks
    m = _from_l2(stats_f_ptr + at * 2, in_row, float("-inf"))
    s = _from_l2(stats_f_ptr + at * 2 + 1, in_row, 0.0)
    n_bad = tl.sum(_from_l2(stats_i_ptr + at * STATS_I + 1, in_row, 0), axis=0)
    z_max = tl.max(m, axis=0)
    arg = _from_l2(stats_i_ptr + at * STATS_I, in_row, V).to(tl.int32)
    token = tl.min(tl.where(in_row & (m == z_max), arg, V), axis=0)
    token = tl.where(token < V, token, 0)  # every value -inf: column 0, as torch.argmax
    if DO_SAMPLE:
        mass = tl.where(in_row & (m > float("-inf")), s * tl.exp(m - z_max), 0.0)  # per chunk, against z_max
        total = tl.sum(mass, axis=0)
        u = tl.load(u_ptr + row)
        if CANDIDATES:
            counts = _from_l2(stats_i_ptr + at * STATS_I + 2, in_row, 0)
            cut = tl.max(_from_l2(stats_i_ptr + at * STATS_I + 4, in_row, NO_CUT), axis=0)
            token, held_all = _draw_candidates(stats_i_ptr, cand_z_ptr, cand_i_ptr, row, n_chunks, z_max, total, cut,
                                               top_k, top_p, u, DO_TOP_K, DO_TOP_P, CAP, N_CHUNKS, HELD_PIVOTS)
            if (tl.max(counts, axis=0) > CAP) | (held_all == 0):
                key_min = tl.min(_from_l2(stats_i_ptr + at * STATS_I + 3, in_row, 0x7FFFFFFF), axis=0)
                token = _filter_and_draw(logits_ptr + row * logits_stride, seen_ptr + row * seen_stride, V, penalty,
                                         temperature, top_k, top_p, u, z_max, total, key_min, HAS_PENALTY, DO_TOP_K,
                                         DO_TOP_P, BLOCK, N_PIVOTS)
        else:
            target = u * total
            passed = tl.cumsum(mass, axis=0) > target
            last = tl.max(tl.where(mass > 0.0, chunks, -1), axis=0)
            chunk = tl.maximum(tl.minimum(tl.min(tl.where(passed, chunks, N_CHUNKS), axis=0), last), 0)
            before = tl.sum(tl.where(chunks < chunk, mass, 0.0), axis=0)
            cols = chunk * CHUNK + tl.arange(0, CHUNK)
            valid = cols < V
            _, z = _load_z(logits_ptr + row * logits_stride, seen_ptr + row * seen_stride, cols, valid, penalty,
                           temperature, HAS_PENALTY, True)
            e = tl.where(valid, tl.exp(z - z_max), 0.0)
            first = tl.min(tl.where(before + tl.cumsum(e, axis=0) > target, cols, V), axis=0)
            token = tl.minimum(first, tl.max(tl.where(e > 0.0, cols, -1), axis=0))
    _finish(out_ptr, pos_ptr, seen_ptr + row * seen_stride, row, token, n_bad, ADVANCE, MARK_SEEN)


@device_fn
def _from_l2(ptr, mask, other):
    """A load of what other programs of the launch may have written (the chunks' results): from L2, past L1."""
    return tl.load(ptr, mask=mask, other=other, cache_modifier=".cg")


@device_fn
def _finish(out_ptr, pos_ptr, seen_row_ptr, row, token, n_bad, ADVANCE: tl.constexpr, MARK_SEEN: tl.constexpr):
    """The row's token out (-1 if its logits held NaN or inf) and, for a generation step (sample's advance and
    mark_seen), the row's position moved on by one and the token marked seen (not a -1: generation stops there).
    Run last: the row's logits and seen set have been read."""
    tl.store(out_ptr + row, tl.where(n_bad > 0, -1, token).to(tl.int64))
    if ADVANCE:
        tl.store(pos_ptr + row, tl.load(pos_ptr + row) + 1)
    if MARK_SEEN:
        if n_bad == 0:
            tl.store(seen_row_ptr + token, 1)


@device_fn
def _draw_candidates(stats_i_ptr, cand_z_ptr, cand_i_ptr, row, n_chunks, z_max, total, cut, top_k, top_p, u,
                     DO_TOP_K: tl.constexpr, DO_TOP_P: tl.constexpr, CAP: tl.constexpr, N_CHUNKS: tl.constexpr,
                     N_PIVOTS: tl.constexpr):
    """Top-k and/or top-p thresholds and the draw over the chunks' candidates, all held in registers:
    (token, 1 if the candidates hold every kept token, else 0). With top-k they do (unless a chunk overflowed
    its CAP slots, which the caller checks). Top-p alone: every value at or above the highest chunk cut is a
    candidate; if those hold at least top_p * total (the whole row's mass), every token below them has that
    much mass above it and is removed, so the top-p set lies among them."""
    slots = tl.arange(0, N_CHUNKS * CAP)  # chunk-major: column order
    chunk = slots // CAP
    count = _from_l2(stats_i_ptr + (row * n_chunks + chunk) * STATS_I + 2, chunk < n_chunks, 0)
    held = (chunk < n_chunks) & (slots % CAP < count)
    at = (row * n_chunks + chunk) * CAP + slots % CAP
    z = _from_l2(cand_z_ptr + at, held, float("-inf"))
    cols = _from_l2(cand_i_ptr + at, held, 0)
    key = _key(z)
    held_all = 1
    if DO_TOP_K:
        lo = tl.min(tl.where(held, key, 0x7FFFFFFF), axis=0)
        floor = _search_held(key, held.to(tl.float32), lo, _key(z_max), top_k, False, N_PIVOTS)
        e = tl.where(held & (key >= floor), tl.exp(z - z_max), 0.0)
        need = top_p * tl.sum(e, axis=0)  # top-p over the top-k set, renormalised
    else:
        floor = cut
        e = tl.where(held & (key >= floor), tl.exp(z - z_max), 0.0)
        need = top_p * total  # top-p over the whole row
        held_all = (tl.sum(e, axis=0) >= need).to(tl.int32)
    if DO_TOP_P:
        floor = 1 + _search_held(key, e, floor - 1, _key(z_max), need, True, N_PIVOTS)
        e = tl.where(key >= floor, e, 0.0)
    first = tl.min(tl.where(tl.cumsum(e, axis=0) > u * tl.sum(e, axis=0), slots, N_CHUNKS * CAP), axis=0)
    pick = tl.minimum(first, tl.max(tl.where(e > 0.0, slots, -1), axis=0))
    return tl.sum(tl.where(slots == pick, cols, 0), axis=0), held_all


def sample(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor, seen: torch.Tensor | None, *,
           out=None, advance: torch.Tensor | None = None, mark_seen: bool = False,
           counters: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) fp32, u (B,) fp32 in [0, 1) (ignored when greedy), seen (B, V) bool or None ->
    token ids (B,) int64 on the device, -1 for rows with NaN/inf logits. A generation step's bookkeeping in the
    same launch: advance (B,) int64 positions, each += 1; mark_seen: seen[b, token] = True (seen required; a row
    of -1 is left alone). counters: a utils.new_counters() buffer of at least B (needed while a CUDA graph is being
    captured, where the split path may merge each row within the chunks' launch: ONE_LAUNCH)."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    check_tensor("logits", logits, 2, (torch.float32,), None, last_contiguous=True)
    dev = logits.device
    B, V = logits.shape
    if V == 0 or V >= 1 << 24:
        raise ValueError(f"the vocabulary must have between 1 and 2^24 - 1 entries, got {V}")
    check_vector("u", u, B, (torch.float32,), dev)
    penalise = seen is not None and params.repetition_penalty != 1.0
    if seen is not None:
        check_tensor("seen", seen, 2, (torch.bool,), dev, last_contiguous=True)
        if seen.shape != logits.shape:
            raise ValueError(f"seen has shape {tuple(seen.shape)}, logits {tuple(logits.shape)}; they must match")
    if mark_seen and seen is None:
        raise ValueError("sample: mark_seen needs the seen set")
    if advance is not None:
        check_vector("advance", advance, B, (torch.int64,), dev)
    # a dummy pointer when there is no penalty and nothing to mark
    seen_u8 = seen.view(torch.uint8) if penalise or mark_seen else logits
    tokens = check_out(out, (B,), torch.int64, dev)
    if B == 0:
        return tokens
    top_k, top_p = params.do_sample and 0 < params.top_k < V, params.do_sample and params.top_p < 1.0
    flags = dict(HAS_PENALTY=penalise, DO_SAMPLE=params.do_sample, DO_TOP_K=top_k, DO_TOP_P=top_p, **pdl_options(dev))
    step = dict(ADVANCE=advance is not None, MARK_SEEN=mark_seen)
    pos = tokens if advance is None else advance  # a dummy pointer without ADVANCE
    values = (float(params.temperature), float(params.top_k), float(params.top_p), float(params.repetition_penalty))
    s = sampling_settings(V, params.do_sample)
    chunk = s.pop("CHUNK")
    held_pivots = s.pop("HELD_PIVOTS")
    n_chunks = triton.cdiv(V, chunk)
    # candidates per chunk: the top k (ties kept); top-p alone, the TOP_P_CANDIDATES largest values first
    per_chunk = params.top_k if top_k else TOP_P_CANDIDATES if top_p else 0
    cap = max(16, triton.next_power_of_2(per_chunk)) if per_chunk else 1
    held = triton.next_power_of_2(n_chunks) * cap  # the merge holds every chunk's candidate slots
    if n_chunks == 1 or held > MAX_CANDIDATES:  # one program streams each row
        _sample_kernel[(B,)](logits, seen_u8, u, tokens, pos, V, logits.stride(0), seen_u8.stride(0), *values,
                             **flags, **step, **s)
        return tokens
    stats_f = torch.empty(B, n_chunks, 2, dtype=torch.float32, device=dev)  # max z, sum exp(z - max z)
    stats_i = torch.empty(B, n_chunks, STATS_I, dtype=torch.int64, device=dev)
    cand_z = torch.empty(B, n_chunks, cap, dtype=torch.float32, device=dev) if per_chunk else stats_f
    cand_i = torch.empty(B, n_chunks, cap, dtype=torch.int32, device=dev) if per_chunk else stats_i
    temperature, _, _, penalty = values
    chunk_flags = {k: v for k, v in flags.items() if k not in ("DO_TOP_K", "DO_TOP_P")}  # top-p is the merge's
    merge_flags = dict(**step, CANDIDATES=per_chunk > 0, N_CHUNKS=triton.next_power_of_2(n_chunks),
                       BLOCK=s["BLOCK"], N_PIVOTS=s["N_PIVOTS"])
    if ONE_LAUNCH and not per_chunk:  # the row's last chunk merges it
        counters = checked_counters(counters, B, dev, "sample")
        _sample_chunk_kernel[(n_chunks, B)](
            logits, seen_u8, stats_f, stats_i, cand_z, cand_i, V, logits.stride(0), seen_u8.stride(0), n_chunks,
            temperature, float(per_chunk), penalty, **chunk_flags, DO_TOP_K=per_chunk > 0, CHUNK=chunk, CAP=cap,
            HELD_PIVOTS=held_pivots, u_ptr=u, out_ptr=tokens, pos_ptr=pos, count_ptr=counters,
            top_p=float(params.top_p), MERGE=True, MERGE_TOP_K=top_k, DO_TOP_P=top_p, **merge_flags,
            num_warps=s["num_warps"])
        return tokens
    _sample_chunk_kernel[(n_chunks, B)](
        logits, seen_u8, stats_f, stats_i, cand_z, cand_i, V, logits.stride(0), seen_u8.stride(0), n_chunks,
        temperature, float(per_chunk), penalty, **chunk_flags, DO_TOP_K=per_chunk > 0, CHUNK=chunk, CAP=cap,
        HELD_PIVOTS=held_pivots, u_ptr=u, out_ptr=tokens, pos_ptr=pos, count_ptr=stats_i, top_p=1.0,
        num_warps=s["num_warps"])
    _sample_merge_kernel[(B,)](
        logits, seen_u8, u, tokens, pos, stats_f, stats_i, cand_z, cand_i, V, logits.stride(0), seen_u8.stride(0),
        n_chunks, *values, **flags, **merge_flags, CHUNK=chunk, CAP=cap, HELD_PIVOTS=held_pivots,
        num_warps=s["num_warps"])
    return tokens
