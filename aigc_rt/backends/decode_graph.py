"""CUDA-graph replay of a model's decode step, or of an image model's forward (used by the triton backend on a GPU).

A capture bakes in the addresses of everything the step reads and writes, so it is keyed by them: the KV cache
and its decode Workspace, and the step's inputs. Two kinds of steps are replayed:
- decode(): the model's decode step on token ids, positions and lengths the caller gives (model.decode, for
  validation): they are copied into static buffers the graph reads, and its logits are a static buffer too;
- replay(): a step that works in place on buffers that stay put, generate()'s decode + sampling on its
  DecodeState (model.decode_sample): nothing is copied in or out;
- run(): any function of tensors, keyed by the caller: its inputs are copied into static buffers, as decode()'s
  (a DCGAN's forward: TritonBackend.run_layers).
The per-layer attention launches depend only on the cache's capacity (cache.max_len), never on a host-side
length that changes per step, so one capture serves every step of a generation. A new batch size or a
compacted cache gets its own entry, and a later generation whose buffers all land at the same addresses (the
caching allocator hands back the blocks just freed) replays without capturing again. The first call for a key
runs the step eagerly (that also compiles and warms up the kernels), then captures it; later calls replay. A
step whose capture fails (an op that syncs with the host, say) warns and runs eagerly from then on.
With capture off (CPU, TRITON_INTERPRET=1, or AIGC_RT_CUDA_GRAPHS=0) every call runs the step eagerly on the
same buffers, so tests exercise that path.
Tests: tests/test_triton_model.py (the static path everywhere; graph replay == eager on a GPU).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

MAX_GRAPHS = 4  # captures kept (least recently used dropped first), each with its activation memory pool


@dataclass
class _Entry:
    inputs: tuple[torch.Tensor, ...] = ()  # decode() / run(): static copies of the inputs
    graph: "torch.cuda.CUDAGraph | None" = None
    out: object = None  # what the captured step returns (decode(): its logits (B, V), a static buffer)
    eager: bool = False  # its capture failed: the step runs eagerly (on the same static buffers) from then on


class DecodeGraph:
    def __init__(self, capture: bool, size: int = MAX_GRAPHS):
        self.capture, self.size = capture, size
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.captures = 0  # graphs captured so far (benchmarks check that their timed runs captured none)

    def decode(self, step, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, cache):
        """step(tokens, positions, lengths, cache, max_len) -> logits (B, V): the model's eager decode step, run
        (or replayed) on copies of the inputs with max_len = cache.max_len, which stays the same across a
        generation's steps. The logits are a static buffer that the next call overwrites (as the eager step's
        are)."""
        key = ("decode", step, tokens.shape[0], cache.max_len, cache.addresses(tokens.shape[0]))
        return self.run(key, lambda *static: step(*static, cache, cache.max_len), tokens, positions, lengths)

    def run(self, key: tuple, fn, *inputs: torch.Tensor):
        """fn(*inputs) run (or replayed) on static copies of the inputs; key: everything else that decides the
        launches, with the inputs' shapes. What fn returns is a static buffer once captured: the next call
        overwrites it."""
        e = self._entry(key)
        if not e.inputs:
            e.inputs = tuple(map(torch.empty_like, inputs))
        for static, given in zip(e.inputs, inputs):
            static.copy_(given)
        return self._replay(e, lambda: fn(*e.inputs))

    def replay(self, key: tuple, fn):
        """fn(): a step that reads and writes only buffers whose addresses `key` holds (with everything else
        that decides its launches). Runs it, as a graph replay once captured."""
        return self._replay(self._entry(key), fn)

    def _entry(self, key: tuple) -> _Entry:
        e = self.entries.get(key)
        if e is None:
            e = self.entries[key] = _Entry()
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        return e

    def _replay(self, e: _Entry, fn):
        if e.graph is not None:
            e.graph.replay()
            return e.out
        out = fn()
        if self.capture and not e.eager:
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            try:
                with torch.cuda.graph(graph):  # records the step; capturing runs nothing
                    e.out = fn()
            except Exception as err:  # e.g. an op that syncs with the host: correct eagerly, only slower
                e.eager = True
                warnings.warn(f"aigc_rt: a step could not be captured as a CUDA graph and runs eagerly "
                              f"({type(err).__name__}: {err})", RuntimeWarning, stacklevel=3)
                return out
            e.graph = graph
            self.captures += 1
        return out
