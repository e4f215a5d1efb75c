"""CUDA-graph replay of a model's decode step (used by the triton backend on a GPU).

The step reads its inputs from static buffers (token ids and positions, (B,) each) and the KV cache, whose
addresses are baked into the graph; the lengths and per-layer attention launches depend only on the cache's
capacity (max_len = cache.max_len), never on a host-side length that changes per step, so one capture serves
every step of a generation. A new batch size or a new (or compacted) cache changes the key and starts over:
the first call for a key runs the step eagerly on the static buffers (that also warms up the kernels), then
captures it; later calls copy the inputs in and replay. With capture off (CPU, TRITON_INTERPRET=1, or
AIGC_RT_CUDA_GRAPHS=0) every call takes the same static-buffer path eagerly, so tests exercise it.
Tests: tests/test_triton_model.py (static path everywhere; graph replay == eager on a GPU).
"""
from __future__ import annotations

import torch


class DecodeGraph:
    def __init__(self, capture: bool):
        self.capture = capture
        self.key = None
        self.tokens = self.positions = None  # static inputs, (B,) int64
        self.logits = None  # static output of the captured step, (B, V) fp32
        self.graph = None

    def __call__(self, step, tokens: torch.Tensor, positions: torch.Tensor, cache, max_len: int) -> torch.Tensor:
        """step(tokens, positions, cache, max_len) -> logits (B, V): the model's eager decode step. max_len is
        only a bound: the step gets cache.max_len, which stays the same across the steps of a generation."""
        key = (step, tokens.shape[0], cache.k.shape, cache.k.data_ptr(), cache.v.data_ptr())
        if key != self.key:
            self.key, self.graph, self.logits = key, None, None
            self.tokens, self.positions = torch.empty_like(tokens), torch.empty_like(positions)
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        if self.graph is not None:
            self.graph.replay()
            return self.logits.clone()  # the next replay overwrites the static output
        logits = step(self.tokens, self.positions, cache, cache.max_len)
        if self.capture:
            self._capture(step, cache)
        return logits

    def _capture(self, step, cache) -> None:
        """Record the step into a graph. Capturing runs nothing (the cache is untouched); the next call
        copies its inputs into the static buffers and replays."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            self.logits = step(self.tokens, self.positions, cache, cache.max_len)
        self.graph = graph
