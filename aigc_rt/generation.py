"""Text generation with Hugging Face `generate` semantics, for any text model (models/text.py: prefill,
decode_sample, head, new_cache, tokenizer; GPT-2 and the Transformer decoder with their KV caches, the LSTM with
its (h, c) state).

All sequences run as one batch: prompts of different lengths are right-padded for the prefill, then every
sequence decodes at its own position in the KV cache, so padding never changes a result. Finished
sequences leave the batch (the cache is compacted), so they stop costing compute. Each step is one
model.decode_sample, in place on the generation's DecodeState (decode, sample the next tokens, advance the
positions; on the triton backend one CUDA-graph replay with nothing copied in or out). The only host sync per
step is reading the sampled tokens. On a GPU that read does not stall the device: the next
step is queued before it (the tokens reach the host through pinned memory), so the device computes step n + 1
while the host decodes text, checks stops and yields step n; a sequence found finished then drops out one
step later, the work queued for it wasted (PIPELINED_DEVICES).
"""
from __future__ import annotations

import random
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .sampling import SamplingParams, uniform

PIPELINED_DEVICES = {"cuda"}  # device types whose next step is queued before this step's tokens are read
CAPACITY_STEP = 64  # a generation's cache holds a multiple of this many positions (at most the context length)
KEPT_BUFFERS = 4  # generations' decode buffers kept for the next ones (DecodeBuffers), least recently used dropped
KEPT_BYTES = 2 << 30  # ... and while the caches kept take more than this, all but the latest set


@dataclass
class Completion:
    text: str  # decoded without special tokens, cut before a stop string
    token_ids: list[int]  # the new tokens only; ends with the eos token when finish_reason == "eos"
    finish_reason: str  # "length" | "eos" | "stop"
    # generate(logprobs=True): log p(token | everything before it) of each new token under the model, the
    # log_softmax of its logits before the repetition penalty, temperature, top-k or top-p reshape them; else None
    logprobs: list[float] | None = None


@dataclass
class Event:
    """One step of one sequence: `piece` is the text that became final with this token."""
    row: int  # prompt-major index: prompt i, sequence j -> i * num_return_sequences + j
    token: int
    piece: str
    finished: Completion | None = None
    logprob: float | None = None  # with logprobs=True (see Completion.logprobs)


def generate(model, prompts, **kwargs) -> list[Completion]:
    """See DESIGN.md: -> list of Completion, prompt-major when num_return_sequences > 1."""
    done: dict[int, Completion] = {}
    for ev in run(model, prompts, **kwargs):
        if ev.finished is not None:
            done[ev.row] = ev.finished
    return [done[i] for i in range(len(done))]


def stream(model, prompt, **kwargs) -> Iterator[str]:
    """Text pieces of one completion as its tokens arrive; they concatenate to generate()'s text and never
    split a UTF-8 character (or leak the start of a stop string). Not a generator function: every argument
    is checked by this call itself, so bad input raises here, before any work, not at the first next()."""
    if kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError(f"stream() produces one sequence; num_return_sequences must be 1, "
                         f"got {kwargs['num_return_sequences']!r}")
    single = _as_prompt_list(prompt, model.tokenizer)
    if len(single) != 1:
        raise ValueError(f"stream() takes one prompt, got a batch of {len(single)}")
    events = run(model, single, **kwargs)  # validates everything now
    return (ev.piece for ev in events if ev.piece)


DEFAULT_MAX_NEW_TOKENS = 64


def run(model, prompts, max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
        top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, num_return_sequences: int = 1,
        seed: int | None = None, stop=None, eos_token_id=None, max_length: int | None = None,
        logprobs: bool = False) -> Iterator[Event]:
    """The decode loop, as a stream of per-token events. Everything is validated by this call, before any
    work (it returns the generator of events rather than being one, so bad input raises here).
    Length, as Hugging Face: max_new_tokens new tokens per sequence (default 64), or, given max_length alone,
    a total of max_length prompt + new tokens per sequence (max_new_tokens wins when both are given).
    logprobs: also give each new token's log-probability under the model (Completion.logprobs)."""
    cfg, tok = model.config, model.tokenizer
    params = SamplingParams(do_sample=bool(do_sample), temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty)
    if max_new_tokens is not None or max_length is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        _check_int("max_new_tokens", max_new_tokens, 1)
    else:
        _check_int("max_length", max_length, 2)
    _check_int("num_return_sequences", num_return_sequences, 1)
    if not isinstance(logprobs, bool):
        raise ValueError(f"logprobs must be True or False, got {logprobs!r}")
    if num_return_sequences > 1 and not params.do_sample:  # as Hugging Face's GenerationConfig.validate()
        raise ValueError(f"num_return_sequences={num_return_sequences} needs do_sample=True: greedy decoding "
                         f"(do_sample=False, no beam search) gives one sequence per prompt, so it supports only "
                         f"num_return_sequences=1; pass do_sample=True to sample several")
    if seed is None:
        seed = random.SystemRandom().getrandbits(63)
    _check_int("seed", seed, None)
    stops = _as_stop_list(stop)
    eos = _as_eos_set(cfg.eos_token_id if eos_token_id is None else eos_token_id, cfg.vocab_size)
    prompt_ids = _as_prompt_list(prompts, tok)
    limits = []  # new tokens per prompt
    for i, p in enumerate(prompt_ids):
        bad = next((t for t in p if not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt {i}: token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
        if max_new_tokens is None and len(p) >= max_length:
            raise ValueError(f"prompt {i} has {len(p)} tokens: max_length={max_length} (prompt + new tokens) "
                             f"leaves no room for a new token")
        limits.append(max_new_tokens or max_length - len(p))
        if len(p) + limits[-1] > cfg.n_positions:
            what = f"max_new_tokens={max_new_tokens}" if max_new_tokens else f"max_length={max_length}"
            raise ValueError(f"prompt {i} has {len(p)} tokens; with {what} that is {len(p) + limits[-1]}, past "
                             f"the context length {cfg.n_positions}")
    return _decode_loop(model, prompt_ids, params, limits, num_return_sequences, seed, stops, eos, logprobs)


@dataclass
class _Row:
    j: int  # index among the prompt's num_return_sequences
    text: "_TextState"
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def _decode_loop(model, prompt_ids, params, limits, n, seed, stops, eos, logprobs) -> Iterator[Event]:
    """limits: new tokens per prompt. The generation's cache and DecodeState come from the model's DecodeBuffers
    and go back there when it ends (or the caller drops the generator half-way), for the next generation."""
    B = len(prompt_ids) * n
    max_len = capacity(model.config.n_positions, max(len(p) + m for p, m in zip(prompt_ids, limits)))
    pool = model.decode_buffers
    with torch.inference_mode():
        lease = pool.take(model, B, max_len, params.repetition_penalty != 1.0)
    try:
        yield from _generation(model, prompt_ids, params, limits, n, seed, stops, eos, logprobs, lease.cache,
                               lease.state)
    finally:
        pool.give_back(lease)


def capacity(n_positions: int, positions: int) -> int:
    """The cache capacity for a generation reaching `positions` positions: rounded up to a multiple of
    CAPACITY_STEP (at most n_positions), so generations of similar lengths share a capacity, and with it their
    decode buffers and the step a backend captured for them (DecodeBuffers)."""
    return min(n_positions, -(-positions // CAPACITY_STEP) * CAPACITY_STEP)


def _generation(model, prompt_ids, params, limits, n, seed, stops, eos, logprobs, cache, state) -> Iterator[Event]:
    """The generation on its decode buffers (cache, state: for the whole batch, state.seen present when there is a
    repetition penalty). The model runs under torch.inference_mode(), entered around each piece of work and never
    held across a yield, so the caller's code between events (or after it drops the generator half-way) does not
    run in inference mode."""
    be, dev, cfg = model.backend, model.device, model.config
    batch = [p for p in prompt_ids for _ in range(n)]  # prompt-major rows
    limit = [m for m in limits for _ in range(n)]  # per row

    rows = [_Row(b % n, _TextState(model.tokenizer, stops)) for b in range(len(batch))]
    lens = [len(p) for p in batch]
    B, T = len(rows), max(lens)
    active = list(range(B))  # batch slot -> row
    pipelined = dev.type in PIPELINED_DEVICES
    fetch = _HostTokens(B, dev)
    with torch.inference_mode():
        ids = torch.zeros(B, T, dtype=torch.long)  # right-padded
        for b, p in enumerate(batch):
            ids[b, : len(p)] = torch.tensor(p)
        ids = ids.to(dev)

        lengths = torch.tensor(lens, device=dev)
        # each prompt prefilled once (rows 0, n, 2n, ...); with n > 1 its state and logits copied to its n sequences
        # (the prompts' cache kept too, so that a replayed prefill finds it where it was captured)
        once = None if n == 1 else model.decode_buffers.take(model, B // n, cache.max_len, False)
        logits = be.run_prefill(model.first_logits, ids[::n], lengths[::n], cache if once is None else once.cache)
        if once is not None:
            cache.repeat_rows(once.cache, n)
            logits = logits.repeat_interleave(n, dim=0)  # (B, V)
            model.decode_buffers.give_back(once)
        state.positions.copy_(lengths)  # where each row's next token goes
        if state.seen is not None:  # the prompts' tokens
            seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool)
            for b, p in enumerate(batch):
                seen[b, p] = True
            state.seen.copy_(seen)

    def draws(step):
        """Write the uniforms of step's draws into state.u, one per active row (greedy ignores them)."""
        if params.do_sample:
            fetch.uniforms([uniform(seed, rows[a].j, step) for a in active], out=state.u)

    step_logprobs = {}  # step -> (rows,) log-probabilities of its tokens, computed before the next step overwrites
    # the logits (on the device; read with the tokens)

    def sampled(step, logits):
        if logprobs:
            tokens = state.tokens.clamp(min=0)[:, None]  # -1 (NaN logits) stops the generation; see mark_seen
            step_logprobs[step] = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens)[:, 0]

    def advance(step):
        """Queue the decode step that feeds back the tokens of step - 1 and samples step's tokens."""
        draws(step)
        sampled(step, model.decode_sample(state, cache, max(lens[a] + step for a in active), params))

    with torch.inference_mode():
        draws(0)
        be.sample(logits, params, state.u, state.seen, out=state.tokens)  # step 0's tokens, from the prefill
        state.mark_seen()
        sampled(0, logits)
    for step in range(max(limit)):
        with torch.inference_mode():
            read = fetch.start(state.tokens, step_logprobs.pop(step, None))
            # pipelined: the next step is queued before this one's tokens are read (unless every row ends here)
            ahead = pipelined and any(step + 1 < limit[a] for a in active)
            if ahead:
                advance(step + 1)
            host, host_logprobs = read()  # the one sync per step
        keep = []
        for slot, (a, t) in enumerate(zip(active, host)):
            if t < 0:
                raise RuntimeError(f"NaN or inf in the logits of sequence {a} at generation step {step}: "
                                   f"the model produced non-finite values (bad weights?)")
            row = rows[a]
            row.tokens.append(t)
            lp = None
            if logprobs:
                lp = host_logprobs[slot]
                row.logprobs.append(lp)
            piece = row.text.push(t)
            reason = ("eos" if t in eos else "stop" if row.text.stopped
                      else "length" if len(row.tokens) == limit[a] else None)
            if reason is None:
                keep.append(slot)
                yield Event(a, t, piece, logprob=lp)
            else:
                piece += row.text.finish()
                yield Event(a, t, piece, Completion(row.text.text, row.tokens, reason,
                                                    row.logprobs if logprobs else None), lp)
        if not keep:
            return
        with torch.inference_mode():
            if len(keep) < len(active):  # finished sequences leave the batch (and the step queued ahead, if
                k = torch.tensor(keep, device=dev)  # any, sampled for them too: their tokens go as well)
                cache.keep(k)
                state.keep(k)
                if step + 1 in step_logprobs:
                    step_logprobs[step + 1] = step_logprobs[step + 1][k]
                active = [active[s] for s in keep]
            if not ahead:
                advance(step + 1)


class Lease(NamedTuple):
    """A generation's decode buffers from DecodeBuffers.take, and what give_back needs to keep them."""
    cache: object  # the model's DecodeCache
    state: "DecodeState"
    key: tuple  # (batch, capacity, penalty, KV dtype)
    tensors: tuple  # the cache's STATE tensors as allocated (a generation compacts the cache into new ones)


class DecodeBuffers:
    """A model's decode buffers kept between generations: a generation takes a DecodeCache and a DecodeState of
    its batch size, cache capacity and kind of state (with or without the repetition penalty's seen set), and gives
    them back when it ends, so the next generation of the same shape runs on the same buffers, at the same
    addresses. A backend that captured the decode step there (the triton backend's CUDA graph, the cpu backend's
    recorded step, both keyed by those addresses) then replays it instead of capturing again: on a GPU a capture
    is an eager step and the capture itself, milliseconds a generation (GPT-2 1.5B: ~250 launches). A generation
    running while another holds the buffers gets buffers of its own. A set holds its cache's memory between
    generations (GPT-2 124M, bf16 cache, 1,024 positions: 38 MB a sequence; 1.5B fp32: 630 MB): at most
    KEPT_BUFFERS sets are kept, and beyond KEPT_BYTES of caches only the latest."""

    def __init__(self):
        self.free: OrderedDict[tuple, Lease] = OrderedDict()
        self.lock = threading.Lock()

    def take(self, model, batch: int, max_len: int, penalty: bool) -> Lease:
        """Buffers kept from an earlier generation of this shape, or new ones."""
        key = (batch, max_len, penalty, getattr(model, "kv_dtype", None))
        with self.lock:
            kept = self.free.pop(key, None)
        if kept is not None:
            return kept
        cache = model.new_cache(batch, max_len)
        state = DecodeState.allocate(batch, model.config.vocab_size, model.device, penalty)
        return Lease(cache, state, key, tuple(getattr(cache, name) for name in cache.STATE))

    def give_back(self, lease: Lease) -> None:
        """Keep a lease's buffers for the next generation of its shape, restored to the full batch (a generation
        compacts the cache and state as its sequences finish)."""
        cache, state, key, tensors = lease
        for name, t in zip(cache.STATE, tensors):
            setattr(cache, name, t)
        state.tokens, state.positions, state.u, state.seen = state._full  # every one rewritten before it is read
        with self.lock:
            self.free[key] = lease
            self.free.move_to_end(key)
            while len(self.free) > KEPT_BUFFERS or len(self.free) > 1 and sum(
                    t.nbytes for kept in self.free.values() for t in kept.tensors) > KEPT_BYTES:
                self.free.popitem(last=False)

    def clear(self) -> None:
        """Drop the kept buffers (their memory goes back to torch's allocator)."""
        with self.lock:
            self.free.clear()


class DecodeState:
    """A generation's per-row state on the device, which each model.decode_sample updates in place: the tokens
    to feed (the last sampled, not yet in the KV cache), their positions, the uniforms of the next draws and
    the tokens seen so far (for the repetition penalty). In place, so that a CUDA graph that captured the step
    replays it with nothing copied in or out. The buffers are allocated for the whole batch; as rows finish,
    the state is the first rows of them, so their addresses stay put."""

    def __init__(self, tokens: torch.Tensor, positions: torch.Tensor, u: torch.Tensor, seen: torch.Tensor | None):
        self.tokens = tokens  # (B,) int64
        self.positions = positions  # (B,) int64
        self.u = u  # (B,) fp32, zeros until written (greedy ignores them)
        self.seen = seen  # (B, V) bool or None
        self._full = self.buffers()  # what keep() compacts into

    @classmethod
    def allocate(cls, batch: int, vocab_size: int, device: torch.device, penalty: bool) -> "DecodeState":
        return cls(torch.zeros(batch, dtype=torch.int64, device=device),
                   torch.zeros(batch, dtype=torch.int64, device=device), torch.zeros(batch, device=device),
                   torch.zeros(batch, vocab_size, dtype=torch.bool, device=device) if penalty else None)

    def mark_seen(self) -> None:
        """Add the tokens to the seen set (a row's -1, NaN logits, marks token 0: generation stops on it with an
        error, which an index of -1 would have pre-empted with one of its own, a device-side assert on a GPU)."""
        if self.seen is not None:
            self.seen.scatter_(1, self.tokens.clamp(min=0)[:, None], True)

    def buffers(self) -> tuple:
        """(tokens, positions, u, seen) as they stand now."""
        return self.tokens, self.positions, self.u, self.seen

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only rows `rows` (in that order), as the first len(rows) rows of the buffers."""
        n = rows.shape[0]
        self.tokens, self.positions, self.u, self.seen = (
            None if full is None else full[:n].copy_(now[rows]) for full, now in zip(self._full, self.buffers()))

    def addresses(self) -> tuple[int, ...]:
        """The buffers a step reads and writes (a CUDA graph bakes them in)."""
        return tuple(0 if t is None else t.data_ptr() for t in self.buffers())


class _HostTokens:
    """The host's side of each step's small transfers. On a CUDA device the sampled tokens go to the host
    through pinned memory, asynchronously, and are waited for only when read, so that work queued after
    them (the next decode step) keeps the device busy meanwhile; the uniforms go the other way the same way
    (a copy from pageable memory would wait for the device). Elsewhere both are plain copies."""

    def __init__(self, batch: int, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.tokens = torch.empty(batch, dtype=torch.int64, pin_memory=True)
            self.logprobs = torch.empty(batch, dtype=torch.float32, pin_memory=True)
            self.u_host = torch.empty(2, batch, dtype=torch.float32, pin_memory=True)  # alternate halves, see uniforms
            self.calls = 0

    def start(self, tokens: torch.Tensor, logprobs: torch.Tensor | None = None):
        """Start moving `tokens` (and their log-probabilities, if given) to the host; returns the function that
        waits for them, as (a list, a list or None). They are read as they are now: the step queued next
        overwrites the tokens."""
        if not self.cuda:
            host = tokens.tolist(), None if logprobs is None else logprobs.tolist()
            return lambda: host
        n = tokens.shape[0]
        self.tokens[:n].copy_(tokens, non_blocking=True)
        if logprobs is not None:
            self.logprobs[:n].copy_(logprobs, non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record()

        def read() -> tuple[list[int], list[float] | None]:
            arrived.synchronize()
            return self.tokens[:n].tolist(), None if logprobs is None else self.logprobs[:n].tolist()
        return read

    def uniforms(self, values: list[float], out: torch.Tensor) -> None:
        """A step's uniforms into `out` on the device. The loop queues step s + 1 with its uniforms before it
        reads step s's tokens, while the copy of step s's uniforms (queued after step s - 1's tokens) may still
        be pending, so the pinned source alternates between two halves: the half rewritten now last served step
        s - 1, whose copy was queued before step s - 1's tokens, which have been read."""
        if not self.cuda:
            out.copy_(torch.tensor(values))
            return
        host = self.u_host[self.calls % 2, :len(values)]
        self.calls += 1
        host.copy_(torch.tensor(values))
        out.copy_(host, non_blocking=True)


class _TextState:
    """Decoded text of one sequence, released in pieces that never split a UTF-8 character and never
    show text that might turn out to be the start of a stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.decoder = tokenizer.stream_decoder()
        self.stops = stops
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        before = len(self.text)
        self.text += self.decoder.push(token)
        if not self.stops:
            return self._release(len(self.text))
        longest = max(map(len, self.stops))
        start = max(0, before - longest + 1)
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._release(len(self.text))
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._release(len(self.text) - hold)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        piece = self.text[self.emitted: upto]
        self.emitted = max(self.emitted, upto)
        return piece


# -- argument checks -----------------------------------------------------------------------------------
def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def _as_prompt_list(prompts, tokenizer) -> list[list[int]]:
    """str | list[str] | list[int] | list[list[int]] (or a 1-D/2-D integer tensor) -> list of id lists."""
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) and not isinstance(t, bool)
                                                                  for t in prompts):
        prompts = [list(prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a str, a list of str, a list of token ids or a list of such lists "
                         "(and not empty)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            p = tokenizer.encode(p)
        elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            p = list(p)
        else:
            raise ValueError(f"prompt {i} must be a str or a list of token ids, got {type(p).__name__}")
        if not p:
            raise ValueError(f"prompt {i} is empty")
        out.append(p)
    return out


def _as_stop_list(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else None
    if stops is None or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


def _as_eos_set(eos, vocab_size) -> frozenset[int]:
    if eos is None:
        return frozenset()
    if not isinstance(eos, (int, list, tuple)):
        raise ValueError(f"eos_token_id must be a token id or a list of them, got {eos!r}")
    ids = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else list(eos)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"eos_token_id {t!r} is not a token id in [0, {vocab_size})")
    return frozenset(ids)
