"""Model configurations: named sizes, validated on construction (they come from files we do not trust)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import FormatError


def _check_fields(cls, values: dict) -> dict:
    """Keep the known fields of `cls`; raise FormatError for missing ones or ones of the wrong type."""
    if not isinstance(values, dict):
        raise FormatError(f"{cls.__name__}: config must be a JSON object, got {type(values).__name__}")
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            if f.default is dataclasses.MISSING:
                raise FormatError(f"{cls.__name__}: config lacks '{f.name}'")
            continue
        v = values[f.name]
        want = {"int": int, "float": (int, float), "int | None": (int, type(None))}[f.type]
        if isinstance(v, bool) or not isinstance(v, want):
            raise FormatError(f"{cls.__name__}: config '{f.name}' must be {f.type}, got {v!r}")
        out[f.name] = v
    return out


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    n_positions: int  # context length
    n_embd: int
    n_layer: int
    n_head: int
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int | None = None

    def __post_init__(self):
        for name, hi in (("vocab_size", 1 << 22), ("n_positions", 1 << 20), ("n_embd", 1 << 16),
                         ("n_layer", 1024), ("n_head", 1024)):
            v = getattr(self, name)
            if not 1 <= v <= hi:
                raise FormatError(f"GPT2Config: {name}={v} is out of range [1, {hi}]")
        if self.n_embd % self.n_head:
            raise FormatError(f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not (math.isfinite(self.layer_norm_epsilon) and 0 < self.layer_norm_epsilon < 1):
            raise FormatError(f"GPT2Config: layer_norm_epsilon={self.layer_norm_epsilon} must be in (0, 1)")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            raise FormatError(f"GPT2Config: eos_token_id={self.eos_token_id} is outside the vocabulary")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, values: dict) -> "GPT2Config":
        return cls(**_check_fields(cls, values))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
