"""CUDA-graph replay of a model's decode step (used by the triton backend on a GPU).

The step reads its inputs from static buffers (token ids, positions and lengths, (B,) each) and the KV cache, whose
addresses are baked into the graph; the lengths and per-layer attention launches depend only on the cache's
capacity (max_len = cache.max_len), never on a host-side length that changes per step, so one capture serves
every step of a generation. The key of a capture is (step, batch, cache shape, and the addresses of the caches
and of the decode Workspace): a new batch size or a compacted cache gets its own entry, and a later generation
whose buffers all land at the same addresses (the caching allocator hands back the blocks just freed) replays
without capturing again; if any one of them moved, the step is captured anew. The first call for
a key runs the step eagerly on the static buffers (that also compiles and warms up the kernels), then
captures it; later calls copy the inputs in and replay. With capture off (CPU, TRITON_INTERPRET=1, or
AIGC_RT_CUDA_GRAPHS=0) every call takes the same static-buffer path eagerly, so tests exercise it.
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
    graph: "torch.cuda.CUDAGraph | None" = None
    logits: torch.Tensor | None = None  # static output of the captured step, (B, V) fp32


class DecodeGraph:
    def __init__(self, capture: bool):
        self.capture = capture
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()

    def __call__(self, step, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, cache,
                 max_len: int) -> torch.Tensor:
        """step(tokens, positions, lengths, cache, max_len) -> logits (B, V): the model's eager decode step.
        max_len is only a bound: the step gets cache.max_len, which stays the same across a generation's steps."""
        key = (step, tokens.shape[0], cache.k.shape, cache.addresses(tokens.shape[0]))
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = _Entry(*map(torch.empty_like, (tokens, positions, lengths)))
            while len(self.entries) > MAX_GRAPHS:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        e.tokens.copy_(tokens)
        e.positions.copy_(positions)
        e.lengths.copy_(lengths)
        if e.graph is not None:
            e.graph.replay()
            return e.logits  # the static output: as the eager step's, a buffer the next step overwrites
        logits = step(e.tokens, e.positions, e.lengths, cache, cache.max_len)
        if self.capture:
            e.graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(e.graph):  # records the step; capturing runs nothing
                e.logits = step(e.tokens, e.positions, e.lengths, cache, cache.max_len)
        return logits
