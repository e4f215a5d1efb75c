"""What every text model shares on top of its prefill / decode / head: the public calls (logits, generate,
stream) and the check of token ids."""
from __future__ import annotations

import torch


class TextModel:
    """A model with config (vocab_size, n_positions), device, tokenizer, prefill(ids, cache, lengths) -> hidden
    (B, T, C) and head(hidden (N, C)) -> logits (N, V); generation.py drives its decode steps."""

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
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {c.vocab_size})")
        return ids.long()

    def generate(self, prompts, **kwargs):
        from ..generation import generate
        return generate(self, prompts, **kwargs)

    def stream(self, prompt, **kwargs):
        from ..generation import stream
        return stream(self, prompt, **kwargs)
