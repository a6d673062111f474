"""SamplingMetadata: one step's SamplingParams as arrays, one row per sequence that samples.

Built on the driver (plain numpy and lists: it is pickled to the rank holding the logits every
step); model/sampler.py applies it there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..sampling_params import SamplingParams
from .grammar import PendingBitmask


@dataclass(slots=True)
class PenaltyInputs:
    """Penalties of a batch, for the rows that have any. Token ids travel flat, with their row."""

    presence: np.ndarray  # float32 [B]
    frequency: np.ndarray  # float32 [B]
    repetition: np.ndarray  # float32 [B]
    output_rows: np.ndarray  # int64 [N]: the row of each generated token in output_ids
    output_ids: np.ndarray  # int64 [N]
    prompt_rows: np.ndarray  # int64 [P]: prompt tokens, only of rows with a repetition penalty
    prompt_ids: np.ndarray  # int64 [P]


@dataclass(slots=True)
class LogitBias:
    """(row, token, bias) triples, added to the logits before any filtering."""

    rows: np.ndarray  # int64 [K]
    token_ids: np.ndarray  # int64 [K]
    values: np.ndarray  # float32 [K]


@dataclass(slots=True)
class SamplingMetadata:
    """One step's sampling inputs, one row per sequence; built on the driver, no torch inside."""

    temperature: np.ndarray  # float32 [B]; < SAMPLING_EPS means greedy
    top_k: np.ndarray  # int64 [B]; 0 = off
    top_p: np.ndarray  # float32 [B]
    min_p: np.ndarray  # float32 [B]
    seeds: list[int | None]
    steps: list[int]  # tokens each row has generated so far; with the seed it picks the draw
    num_logprobs: list[int | None]  # top-k log-probabilities to return per row, None for none
    penalties: PenaltyInputs | None = None  # None when no row has one
    banned_rows: np.ndarray | None = None  # min_tokens: (row, token) pairs that may not be
    banned_ids: np.ndarray | None = None  # sampled yet (eos and stop_token_ids)
    bias: LogitBias | None = None  # logit_bias of the rows that have one
    # Structured outputs: the rows under a grammar and, per such row, the tokens it allows as
    # packed bits (int32 words, bit t % 32 of word t // 32; tokens past the words: not allowed).
    allowed_rows: np.ndarray | None = None  # int64 [R]
    # int32 [R, ceil(V / 32)]; in this process it may still be filling (the grammar's matchers run
    # on the driver while the ranks compute the logits): bitmask() waits for it.
    allowed_bitmask: np.ndarray | PendingBitmask | None = None

    def bitmask(self) -> np.ndarray | None:
        """allowed_bitmask, once filled (waits for a pending fill, and keeps its result)."""
        if isinstance(self.allowed_bitmask, PendingBitmask):
            self.allowed_bitmask = self.allowed_bitmask.result()
        return self.allowed_bitmask

    @property
    def batch_size(self) -> int:
        return len(self.temperature)

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        eos_token_ids: Iterable[int] = (),
        allowed_rows: Sequence[int] = (),
        allowed_bitmask: np.ndarray | PendingBitmask | None = None,
    ) -> SamplingMetadata:
        """Row i samples the next token of a sequence with prompt_token_ids[i] and
        output_token_ids[i] so far. Prompt ids matter only for a repetition penalty.
        allowed_bitmask: one row of packed allowed tokens per row in allowed_rows (a grammar's)."""
        eos = list(eos_token_ids)
        b = len(params)
        temperature = np.fromiter((p.temperature for p in params), np.float32, b)
        top_k = np.fromiter((max(p.top_k, 0) for p in params), np.int64, b)
        top_p = np.fromiter((p.top_p for p in params), np.float32, b)
        min_p = np.fromiter((p.min_p for p in params), np.float32, b)
        steps = [len(o) for o in output_token_ids]

        penalties = None
        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        if pen_rows:
            out_rows, out_ids, pr_rows, pr_ids = [], [], [], []
            for i in pen_rows:
                out_ids.append(np.asarray(output_token_ids[i], np.int64))
                out_rows.append(np.full(len(out_ids[-1]), i, np.int64))
                if params[i].repetition_penalty != 1.0:
                    pr_ids.append(np.asarray(prompt_token_ids[i], np.int64))
                    pr_rows.append(np.full(len(pr_ids[-1]), i, np.int64))
            cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
            penalties = PenaltyInputs(
                presence=np.fromiter((p.presence_penalty for p in params), np.float32, b),
                frequency=np.fromiter((p.frequency_penalty for p in params), np.float32, b),
                repetition=np.fromiter((p.repetition_penalty for p in params), np.float32, b),
                output_rows=cat(out_rows),
                output_ids=cat(out_ids),
                prompt_rows=cat(pr_rows),
                prompt_ids=cat(pr_ids),
            )

        banned_rows = banned_ids = None
        # A grammar decides where its text may end: min_tokens does not ban its end of sequence.
        banned = [
            (i, t)
            for i, p in enumerate(params)
            if steps[i] < p.min_tokens and p.structured_outputs is None
            for t in (p.stop_token_ids if p.ignore_eos else [*eos, *p.stop_token_ids])
        ]
        if banned:
            banned_rows, banned_ids = (np.array(c, np.int64) for c in zip(*banned))

        bias = None
        biased = [(i, t, v) for i, p in enumerate(params) if p.logit_bias for t, v in p.logit_bias.items()]
        if biased:
            rows_, ids_, values_ = zip(*biased)
            bias = LogitBias(np.array(rows_, np.int64), np.array(ids_, np.int64), np.array(values_, np.float32))

        return cls(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seeds=[p.seed for p in params],
            steps=steps,
            num_logprobs=[p.logprobs for p in params],
            penalties=penalties,
            banned_rows=banned_rows,
            banned_ids=banned_ids,
            bias=bias,
            allowed_rows=np.asarray(allowed_rows, np.int64) if len(allowed_rows) else None,
            allowed_bitmask=allowed_bitmask if len(allowed_rows) else None,
        )
