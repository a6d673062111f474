"""StepInput: one forward step of a ragged batch, built on the driver from TextContexts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sampling_metadata import SamplingMetadata
from .text_context import TextContext


@dataclass(slots=True)
class SamplingInput:
    """What the rank holding the logits does with them, so that only token ids and the asked-for
    log-probabilities travel back. Row indices point into StepInput.logit_rows."""

    metadata: SamplingMetadata
    sample_rows: np.ndarray  # [S] one per sequence that samples this step, ascending
    prompt_rows: np.ndarray  # [P] rows scored for prompt_logprobs
    prompt_targets: np.ndarray  # [P] the prompt token that follows each of those rows
    prompt_num_logprobs: list[int]  # [P] top-k to return with each


@dataclass(slots=True)
class StepInput:
    """Flat numpy arrays so a step pickles small and fast. N tokens, B sequences."""

    tokens: np.ndarray  # [N] int64
    positions: np.ndarray  # [N] int64
    query_start_loc: np.ndarray  # [B+1] int32: sequence b owns tokens [query_start_loc[b], query_start_loc[b+1])
    context_lens: np.ndarray  # [B] int32: cached tokens including this step's
    block_tables: np.ndarray  # [B, max_blocks] int32 (padded with 0)
    slot_mapping: np.ndarray  # [N] int64: block * block_size + offset
    logit_rows: np.ndarray  # [M] int64: rows whose logits rank 0 returns, ascending
    hidden_rows: np.ndarray | None = None  # rows whose hidden states rank 0 returns
    normalized_hidden: bool = False
    sampling: SamplingInput | None = None  # set: sample on rank 0 and return no logits
    # [N] int64 or None: for token i, the row of the previous step's sampled tokens that holds
    # its value (-1: tokens[i] is given). Set when the step was scheduled before the previous
    # one's tokens reached the host (overlapped scheduling); the worker takes them on the device.
    previous_rows: np.ndarray | None = None


def build_step_input(
    contexts: list[TextContext], num_new_tokens: list[int], block_size: int, logit_rows: np.ndarray | None = None
) -> StepInput:
    """The step that computes tokens[num_computed : num_computed + n] of each context.

    Every context must already hold the KV blocks for those tokens. logit_rows (ascending, no
    row twice) defaults to the last row of each sequence.
    """
    b = len(contexts)
    if logit_rows is None and all(n == 1 for n in num_new_tokens):
        return _decode_step_input(contexts, block_size)
    counts = np.asarray(num_new_tokens, dtype=np.int64)
    offsets = np.zeros(b + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(counts)
    starts = np.fromiter((c.num_computed_tokens for c in contexts), dtype=np.int64, count=b)
    block_tables = np.zeros((b, max(len(c.block_ids) for c in contexts)), dtype=np.int32)
    for row, ctx in zip(block_tables, contexts):
        row[: len(ctx.block_ids)] = ctx.block_ids
    # Vectorised over the whole batch: one numpy call per array, not one per sequence.
    seq_of_token = np.repeat(np.arange(b), counts)
    positions = np.arange(int(offsets[-1]), dtype=np.int64) + np.repeat(starts - offsets[:-1], counts)
    slots = block_tables[seq_of_token, positions // block_size].astype(np.int64) * block_size + positions % block_size
    tokens = np.fromiter(
        (t for c, s, n in zip(contexts, starts.tolist(), num_new_tokens) for t in c.tokens[s : s + n]),
        dtype=np.int64,
        count=int(offsets[-1]),
    )
    context_lens = (starts + counts).astype(np.int32)
    if logit_rows is not None and len(logit_rows) > 1 and not (np.diff(logit_rows) > 0).all():
        raise ValueError(f"logit_rows must ascend with no row twice, got {logit_rows.tolist()}")
    if logit_rows is None:
        logit_rows = offsets[1:].astype(np.int64) - 1
    return StepInput(
        tokens=tokens,
        positions=positions,
        query_start_loc=offsets,
        context_lens=context_lens,
        block_tables=block_tables,
        slot_mapping=slots,
        logit_rows=logit_rows,
    )


def _decode_step_input(contexts: list[TextContext], block_size: int) -> StepInput:
    """build_step_input's arrays for a step of one token per context (every decode step), from
    Python lists: the general path's dozen numpy calls cost ~80 us a step on a CPU, whose decode
    step runs its Python from caches the weights have just streamed through (SmolLM2 in int4:
    ~3 ms a step); these cost ~20."""
    b = len(contexts)
    positions = [c.num_computed_tokens for c in contexts]
    widest = max(len(c.block_ids) for c in contexts)
    block_tables = np.array([c.block_ids + [0] * (widest - len(c.block_ids)) for c in contexts], dtype=np.int32)
    return StepInput(
        tokens=np.array([c.tokens[p] for c, p in zip(contexts, positions)], dtype=np.int64),
        positions=np.array(positions, dtype=np.int64),
        query_start_loc=np.arange(b + 1, dtype=np.int32),
        context_lens=np.array(positions, dtype=np.int32) + 1,
        block_tables=block_tables,
        slot_mapping=np.array(
            [c.block_ids[p // block_size] * block_size + p % block_size for c, p in zip(contexts, positions)],
            dtype=np.int64,
        ),
        logit_rows=np.arange(b, dtype=np.int64),
    )
