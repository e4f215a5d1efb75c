"""What every text model shares on top of its prefill / decode / head: the public calls (logits, generate,
stream, perplexity), the check of token ids, and the shape of its decode state (DecodeCache, StepBuffers)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ..generation import DecodeBuffers

HEAD_CHUNK_LOGITS = 1 << 24  # perplexity(): logits held at once (64 MB of fp32), so a long window needs no (T, V)


@dataclass(frozen=True)
class Perplexity:
    """TextModel.perplexity's result. Sums over several texts add up: Perplexity(a.tokens + b.tokens, a.nll + b.nll)."""
    tokens: int  # the tokens scored: every token of the text but the first
    nll: float  # their negative log-likelihood under the model, summed, in nats

    @property
    def nats_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token)


class StepBuffers:
    """Base of a model's Workspace dataclass (preallocated buffers, one row per token): views of its first rows,
    and where its buffers are."""

    def rows(self, n: int):
        """Views of the first n rows (no new memory)."""
        return type(self)(**{f.name: getattr(self, f.name)[:n] for f in fields(self)})

    def addresses(self) -> tuple[int, ...]:
        return tuple(getattr(self, f.name).data_ptr() for f in fields(self))


class DecodeCache:
    """A batch's decode state between steps (GPT-2's keys and values, the LSTM's (h, c)): the tensors named in
    STATE, each with the batch in dim 1, and the decode step's Workspace for the batch (views of it for fewer
    rows, as sequences finish). generation.py and the backends' step replays use only this interface."""
    STATE: tuple[str, ...] = ()

    def __init__(self, workspace: StepBuffers, batch: int, max_len: int):
        self.max_len = max_len  # positions a generation may reach
        self._workspaces = {batch: workspace}

    def workspace(self, batch: int):
        """The decode buffers for `batch` rows (made once per batch size)."""
        if batch not in self._workspaces:
            self._workspaces[batch] = self._workspaces[max(self._workspaces)].rows(batch)
        return self._workspaces[batch]

    def addresses(self, batch: int) -> tuple:
        """Where a decode step over `batch` rows reads and writes: the state (with its dtypes: a KV cache of
        another dtype may land where a freed one was) and that batch's Workspace. A CUDA graph or a recorded cpu
        step bakes these in, so it may be replayed only while all of them are the same."""
        state = (getattr(self, name) for name in self.STATE)
        return (*((t.data_ptr(), t.dtype) for t in state), *self.workspace(batch).addresses())

    def repeat_rows(self, prefilled: "DecodeCache", n: int) -> None:
        """Row b := row b // n of `prefilled`, a cache of the same max_len with 1/n the rows: each of a prompt's n
        sequences (num_return_sequences) starts from the one prefill of that prompt. In place: the tensors keep
        their addresses."""
        for name in self.STATE:
            getattr(self, name).copy_(getattr(prefilled, name).repeat_interleave(n, dim=1))

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished sequences: keep only batch rows `rows` (in that order)."""
        for name in self.STATE:
            setattr(self, name, getattr(self, name)[:, rows].contiguous())


class TextModel:
    """A model with config (vocab_size, n_positions), device, backend, tokenizer, lm_head (a backend linear),
    new_cache(batch, max_len) -> a DecodeCache, prefill(ids, cache, lengths) -> hidden (B, T, C), and
    _decode_step(tokens, positions, lengths, cache, max_len) -> logits (B, V) doing all its work in backend ops on
    its inputs, the cache and the cache's Workspace (so that a backend can replay it: TorchBackend.run_decode).
    generation.py drives it through decode_sample."""

    def __init__(self, config, backend, tokenizer, dtype: str):
        self.config, self.backend, self.tokenizer, self.dtype = config, backend, tokenizer, dtype
        self.device = backend.device
        self.decode_buffers = DecodeBuffers()  # generate()'s caches, kept for the next generations (clear() frees)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, C) -> logits (N, V) fp32."""
        return self.backend.linear(hidden.contiguous(), self.lm_head)

    def first_logits(self, ids: torch.Tensor, cache: DecodeCache, lengths: torch.Tensor) -> torch.Tensor:
        """generate()'s prefill: ids (B, T) right-padded, lengths (B,) -> the logits after each row's last token,
        (B, V) fp32, with the cache filled. The backend runs it (backend.run_prefill: for short prompts the triton
        backend replays it from a CUDA graph, on the prompts right-padded to a multiple of 16 tokens)."""
        hidden = self.prefill(ids, cache, lengths)
        return self.head(hidden[torch.arange(ids.shape[0], device=ids.device), lengths - 1])

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: DecodeCache, max_len: int) -> torch.Tensor:
        """One new token per sequence. tokens, positions (B,) int64 on the device; max_len (host int)
        >= max(positions) + 1. Advances the cache by the token (GPT-2: writes its k, v at its position) and
        returns logits (B, V) fp32: a buffer of the cache's workspace, overwritten by the next decode step (clone it
        to keep it). The backend runs the step (the triton backend replays it from a CUDA graph, the cpu backend
        from its recorded ops)."""
        lengths = torch.add(positions, 1, out=cache.workspace(tokens.shape[0]).lengths)  # cached positions after it
        return self.backend.run_decode(self._decode_step, tokens, positions, lengths, cache, max_len)

    def decode_sample(self, state, cache: DecodeCache, max_len: int, params) -> torch.Tensor:
        """generate()'s step, in place on state (a generation.DecodeState): decode state.tokens at
        state.positions, sample the next tokens into state.tokens (backend.sample with state.u and state.seen),
        advance the positions and add the new tokens to state.seen. The triton backend replays it all from one
        CUDA graph. Returns the step's logits (B, V), which the next step overwrites."""
        return self.backend.run_decode_sample(self._decode_step, state, cache, max_len, params)

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """Full forward for validation: LongTensor (B, T) -> float32 (B, T, V)."""
        ids = self.check_ids(torch.as_tensor(input_ids))
        B, T = ids.shape
        return self.head(self.prefill(ids.to(self.device), None).reshape(B * T, -1)).view(B, T, -1)

    def check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.config
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor (B, T), got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] == 0 or ids.shape[0] == 0:
            raise ValueError("input_ids is empty")
        if ids.shape[1] > c.n_positions:
            raise ValueError(f"input of {ids.shape[1]} tokens exceeds the context length {c.n_positions}")
        self._check_vocabulary(int(ids.min()), int(ids.max()))
        return ids.long()

    def _check_vocabulary(self, lo: int, hi: int) -> None:
        """Token ids from lo to hi (the smallest and the largest) within the vocabulary, or a ValueError."""
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.config.vocab_size})")

    @torch.inference_mode()
    def perplexity(self, text, window: int | None = None, stride: int | None = None) -> Perplexity:
        """How well the model predicts a text (a str, or its token ids): every token but the first is scored once,
        by -log p(token | the tokens before it in its window). Windows of `window` input tokens (default and
        at most the context length) start every `stride` tokens (default: window, so they do not overlap);
        a window predicts the token after each of its inputs, and where windows overlap a token is scored by the
        first window that has it as a target, so a stride below the window gives every token at least
        window - stride tokens of context, at window / stride times the work (Hugging Face's "perplexity of
        fixed-length models" recipe). Runs the model's prefill; the lm_head in chunks of rows."""
        ids = self.tokenizer.encode(text) if isinstance(text, str) else torch.as_tensor(text).reshape(-1).tolist()
        if len(ids) < 2:
            raise ValueError(f"perplexity needs a text of at least 2 tokens, got {len(ids)}")
        self._check_vocabulary(min(ids), max(ids))
        window = self.config.n_positions if window is None else window
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= self.config.n_positions:
            raise ValueError(f"window must be an int in [1, {self.config.n_positions}] (the context length), "
                             f"got {window!r}")
        stride = window if stride is None else stride
        if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
            raise ValueError(f"stride must be an int in [1, window = {window}], got {stride!r}")
        nll, scored, start = 0.0, 1, 0  # scored: the next target's index
        rows = max(1, HEAD_CHUNK_LOGITS // self.config.vocab_size)
        while scored < len(ids):
            end = min(start + window, len(ids) - 1)  # inputs ids[start:end] predict ids[start + 1:end + 1]
            hidden = self.prefill(torch.tensor([ids[start:end]], device=self.device), None)[0]  # (end - start, C)
            for r in range(scored - 1 - start, end - start, rows):
                h = hidden[r: min(r + rows, end - start)]
                targets = torch.tensor(ids[start + r + 1: start + r + 1 + h.shape[0]], device=self.device)
                logp = torch.log_softmax(self.head(h).float(), dim=-1)
                nll -= logp.gather(1, targets[:, None]).double().sum().item()
            scored, start = end + 1, start + stride
        return Perplexity(len(ids) - 1, nll)

    def generate(self, prompts, **kwargs):
        from ..generation import generate
        return generate(self, prompts, **kwargs)

    def stream(self, prompt, **kwargs):
        from ..generation import stream
        return stream(self, prompt, **kwargs)



