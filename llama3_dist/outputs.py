"""What a request produces, in the shapes vLLM users know (`RequestOutput`, `CompletionOutput`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# One position's log-probabilities, as vLLM returns them: token id -> Logprob.
LogprobsDict = dict[int, "Logprob"]


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probabilities of one position as they travel from the sampler to the driver.

    Entry 0 is the chosen token (the sampled one, or the actual next prompt token), followed by
    the `k` most likely tokens in order. Plain lists, so a step's worth pickles small.
    """

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]

    @property
    def chosen_logprob(self) -> float:
        return self.logprobs[0]

    def to_dict(self, decode: Callable[[int], str | None] | None = None) -> LogprobsDict:
        """The vLLM form: the top k and the chosen token (once, if it is also in the top k)."""
        out: LogprobsDict = {}
        for tid, lp, rank in zip(self.token_ids, self.logprobs, self.ranks):
            if tid not in out:
                out[tid] = Logprob(lp, rank, decode(tid) if decode is not None else None)
        return out


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # None unless the request asked for logprobs
    logprobs: list[LogprobsDict] | None
    finish_reason: str | None = None  # "stop", "length", "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[LogprobsDict | None] | None  # None for the first prompt token
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # embedding requests (PoolingParams): the pooled, L2-normalised final hidden state
    embedding: list[float] | None = None
