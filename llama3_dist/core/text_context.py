"""TextContext: one sequence's tokens and where its K/V live in the paged cache."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class TextContext:
    tokens: list[int]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    max_length: int | None = None
    # Blocks of the KV cache holding this sequence, in order, and how many of `tokens` are in them.
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def check_tokens(label: str, tokens: list[int], vocab_size: int, start: int = 0) -> None:
    """Refuses an empty sequence, or an id in tokens[start:] outside [0, vocab_size)."""
    if not tokens:
        raise ValueError(f"{label}: the prompt is empty; give at least one token")
    bad = next((t for t in tokens[start:] if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{label}: token id {bad} is outside the vocabulary [0, {vocab_size})")
