"""StepInput: one forward step of a ragged batch, built on the driver from TextContexts."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .context import TextContext
from .sampling import SamplingMetadata


@dataclass(slots=True)
class SamplingInput:
    """What the rank holding the logits does with them, so that only token ids and the asked-for
    log-probabilities travel back. Row indices point into StepInput.logit_rows."""
    metadata: SamplingMetadata
    sample_rows: np.ndarray          # [S] one per sequence that samples this step
    prompt_rows: np.ndarray          # [P] rows scored for prompt_logprobs
    prompt_targets: np.ndarray       # [P] the prompt token that follows each of those rows
    prompt_num_logprobs: list[int]   # [P] top-k to return with each


@dataclass(slots=True)
class StepInput:
    """Flat numpy arrays so a step pickles small and fast. N tokens, B sequences."""
    tokens: np.ndarray             # [N] int64
    positions: np.ndarray          # [N] int64
    input_row_offsets: np.ndarray  # [B+1] int32
    context_lens: np.ndarray       # [B] int32: cached tokens including this step's
    block_tables: np.ndarray       # [B, max_pages] int32 (padded with 0)
    slot_mapping: np.ndarray       # [N] int64: page * page_size + offset
    logit_rows: np.ndarray         # [M] int64: rows whose logits rank 0 returns
    hidden_rows: np.ndarray | None = None  # rows whose hidden states rank 0 returns
    normalized_hidden: bool = False
    sampling: SamplingInput | None = None  # set: sample on rank 0 and return no logits


def build_step_input(contexts: list[TextContext], num_new_tokens: list[int], page_size: int,
                     logit_rows: np.ndarray | None = None) -> StepInput:
    """The step that computes tokens[num_computed : num_computed + n] of each context.

    Every context must already hold the KV pages for those tokens. logit_rows defaults to the
    last row of each sequence.
    """
    offsets = np.zeros(len(contexts) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(num_new_tokens)
    tokens, positions, slots = [], [], []
    context_lens = np.empty(len(contexts), dtype=np.int32)
    max_pages = max(len(c.block_ids) for c in contexts)
    block_tables = np.zeros((len(contexts), max_pages), dtype=np.int32)
    for b, (ctx, n) in enumerate(zip(contexts, num_new_tokens)):
        start = ctx.num_computed_tokens
        pos = np.arange(start, start + n, dtype=np.int64)
        pages = np.asarray(ctx.block_ids, dtype=np.int64)
        tokens.append(ctx.tokens[start:start + n])
        positions.append(pos)
        slots.append(pages[pos // page_size] * page_size + pos % page_size)
        context_lens[b] = start + n
        block_tables[b, :len(pages)] = pages
    if logit_rows is None:
        logit_rows = offsets[1:].astype(np.int64) - 1
    return StepInput(tokens=np.fromiter((t for ts in tokens for t in ts), dtype=np.int64, count=int(offsets[-1])),
                     positions=np.concatenate(positions), input_row_offsets=offsets,
                     context_lens=context_lens, block_tables=block_tables,
                     slot_mapping=np.concatenate(slots), logit_rows=logit_rows)
