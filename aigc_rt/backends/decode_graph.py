"""CUDA-graph replay of a model's decode step (used by the triton backend on a GPU).

The step reads its inputs from static buffers (token ids, positions and lengths, (B,) each) and the KV cache, whose
addresses are baked into the graph; the lengths and per-layer attention launches depend only on the cache's
capacity (max_len = cache.max_len), never on a host-side length that changes per step, so one capture serves
every step of a generation. The key of a capture is (step, batch, cache shape, and the addresses of the caches
and of the decode Workspace): a new batch size or a compacted cache gets its own entry, and a later generation
whose buffers all land at the same addresses (the caching allocator hands back the blocks just freed) replays
without capturing again; if any one of them moved, the step is captured anew. The first call for
a key runs the step eagerly on the static buffers (that also compiles and warms up the kernels), then
captures it; later calls copy the inputs in and replay. With a sampler the graph also samples the next
tokens from the step's logits (generate()'s loop: one replay and a few copies a token, no sampling launches
from the host). With capture off (CPU, TRITON_INTERPRET=1, or AIGC_RT_CUDA_GRAPHS=0) every call takes the same
static-buffer path eagerly, so tests exercise it.
Tests: tests/test_triton_model.py (static path everywhere; graph replay == eager on a GPU).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_GRAPHS = 4  # captures kept (least recently used dropped first), each with its activation memory pool


@dataclass
class _Entry:
    tokens: torch.Tensor  # static inputs, (B,) int64
    positions: torch.Tensor
    lengths: torch.Tensor
    u: torch.Tensor | None = None  # with a sampler: its static inputs, (B,) fp32 and (B, V) bool or None
    seen: torch.Tensor | None = None
    graph: "torch.cuda.CUDAGraph | None" = None
    out: torch.Tensor | None = None  # static output of the captured step: logits (B, V) or sampled tokens (B,)


class DecodeGraph:
    def __init__(self, capture: bool):
        self.capture = capture
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def __call__(self, step, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, cache,
                 max_len: int, sampler=None) -> torch.Tensor:
        """step(tokens, positions, lengths, cache, max_len) -> logits (B, V): the model's eager decode step.
        max_len is only a bound: the step gets cache.max_len, which stays the same across a generation's steps.
        sampler = (sample, params, u, seen): the step's logits are sampled in the same replay,
        sample(logits, params, u, seen, out=) (the backend's op; u and seen are copied in like the other
        inputs), and the next tokens (B,) int64 are returned instead. Either output is a static buffer that the
        next call overwrites (as the eager step's logits are)."""
        key = (step, tokens.shape[0], cache.k.shape, cache.addresses(tokens.shape[0]))
        if sampler is not None:
            sample, params, u, seen = sampler
            key += (sample, params, None if seen is None else seen.shape)
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = _Entry(*map(torch.empty_like, (tokens, positions, lengths)))
            if sampler is not None:
                e.u = torch.empty_like(u)
                e.seen = None if seen is None else torch.empty_like(seen)
            while len(self.entries) > MAX_GRAPHS:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        for static, given in ((e.tokens, tokens), (e.positions, positions), (e.lengths, lengths)):
            static.copy_(given)
        if sampler is not None:
            e.u.copy_(u)
            if seen is not None:
                e.seen.copy_(seen)
        if e.graph is not None:
            e.graph.replay()
            return e.out
        out = self._run(step, e, cache, sampler)
        if self.capture:
            e.graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(e.graph):  # records the step; capturing runs nothing
                e.out = self._run(step, e, cache, sampler)
        return out

    @staticmethod
    def _run(step, e: _Entry, cache, sampler) -> torch.Tensor:
        """The step (and its sampling) on the entry's static inputs."""
        logits = step(e.tokens, e.positions, e.lengths, cache, cache.max_len)
        if sampler is None:
            return logits
        sample, params = sampler[:2]
        return sample(logits, params, e.u, e.seen, out=torch.empty_like(e.tokens))
