"""Continuous batching (vLLM v1 style): requests join and leave the running batch at every step,
long prompts are prefilled in chunks under a token budget, and when KV blocks run out the newest
running request is preempted and later recomputed. No torch here.

The engine's loop, once per step:

    out = scheduler.schedule()
    # run the model on every entry of out.scheduled: the tokens
    #   e.context.tokens[e.start : e.start + e.num_new_tokens] at positions e.start.., written
    #   through the block table e.context.block_ids; sample one token for each entry whose
    #   `samples` is True (from the logits of its last token).
    new = scheduler.update(out, {request_id: token_id for each sampling entry})
    # for each request in `new`, check stop/length and call scheduler.finish(request_id);
    # report the requests in out.capped as finished for length (already released).

update() is commit() then fill(). An engine that runs the next step while the device still
computes this one (overlapped scheduling) calls them apart: commit(out) right after launching
the step (the computed tokens advance, and each token the step will sample is a PLACEHOLDER in
its context), schedule() the next step, then fill(out, tokens) once the values are back.

Every schedule() is followed by a commit() (or update()) of its output before the next
schedule(); at most one committed output awaits its fill(). finish() and abort() may come at any
time; commit() and fill() skip entries for requests finished in between (fill() still records the
token of a request preempted in between: it was sampled from valid logits).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import count
from typing import Generic, TypeVar

from . import block_manager
from .block_manager import BlockManager
from .text_context import TextContext

# What the engine keeps with each request (its sampling state); the scheduler never reads it.
DataT = TypeVar("DataT")
# A sampled token whose value is not back on the host yet (see commit()). Never a real id.
PLACEHOLDER = block_manager.PLACEHOLDER


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again; its K/V was dropped and will be recomputed
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request(Generic[DataT]):
    context: TextContext
    prompt_len: int
    arrival: int  # admission order: lower is older
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    use_prefix_cache: bool = True  # off for requests that need every prompt row (prompt_logprobs)
    data: DataT | None = None  # the engine's (sampling params, detokenizer state); never read here
    # False once the engine knows the request's last token is in flight (max_tokens, context
    # length): it stays in the running batch, holding its blocks, but is not scheduled again.
    schedulable: bool = True

    @property
    def request_id(self) -> str:
        return self.context.request_id

    @property
    def output_token_ids(self) -> list[int]:
        return self.context.tokens[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        return self.context.num_tokens - self.prompt_len


@dataclass(slots=True)
class ScheduledSequence(Generic[DataT]):
    """One sequence's share of a step: `num_new_tokens` tokens starting at position `start`
    (= context.num_computed_tokens when scheduled). `samples` is False for a prefill chunk
    that stops short of the last token: the model returns no token for it."""

    request: Request[DataT]
    start: int
    num_new_tokens: int
    samples: bool
    placeholder: int = -1  # where commit() put the token this entry samples

    @property
    def context(self) -> TextContext:
        return self.request.context

    @property
    def request_id(self) -> str:
        return self.request.context.request_id

    @property
    def token_ids(self) -> list[int]:
        return self.request.context.tokens[self.start : self.start + self.num_new_tokens]


@dataclass(slots=True)
class SchedulerOutput(Generic[DataT]):
    scheduled: list[ScheduledSequence[DataT]] = field(default_factory=list)  # running first, then new
    num_batched_tokens: int = 0
    preempted: list[Request[DataT]] = field(default_factory=list)  # sent back to waiting this step
    # Finished by the scheduler: the whole KV cache cannot hold their next token. The engine
    # reports them as finished for length; they are already released.
    capped: list[Request[DataT]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scheduled)


@dataclass(slots=True, frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_cache_usage: float
    num_cached_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: float


class Scheduler(Generic[DataT]):
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        enable_prefix_caching: bool = True,
    ):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) and max_num_seqs ({max_num_seqs}) must be >= 1"
            )
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.requests: dict[str, Request[DataT]] = {}
        self.waiting: deque[Request[DataT]] = deque()  # FCFS; preempted requests go back to the front
        self.running: list[Request[DataT]] = []  # ordered by arrival: the newest is last
        self.num_preemptions = 0
        self._arrivals = count()
        self._pending: SchedulerOutput[DataT] | None = None  # scheduled, not yet committed
        self._unfilled: SchedulerOutput[DataT] | None = None  # committed, its tokens not yet filled

    @property
    def max_tokens_in_cache(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def add_request(self, ctx: TextContext, data: DataT | None = None, use_prefix_cache: bool = True) -> Request[DataT]:
        if ctx.request_id in self.requests:
            raise ValueError(f"request id {ctx.request_id!r} is already in the scheduler")
        if not ctx.tokens:
            raise ValueError(f"request {ctx.request_id!r} has an empty prompt")
        if ctx.block_ids or ctx.num_computed_tokens:
            raise ValueError(f"request {ctx.request_id!r} already holds KV blocks; pass a fresh context")
        if ctx.num_tokens > self.max_tokens_in_cache:
            raise ValueError(
                f"request {ctx.request_id!r}: its prompt of {ctx.num_tokens} tokens can never fit "
                f"the KV cache ({self.block_manager.num_blocks} blocks of "
                f"{self.block_manager.block_size} = {self.max_tokens_in_cache} tokens). Shorten "
                f"the prompt or give the cache more memory."
            )
        req = Request(
            ctx, prompt_len=ctx.num_tokens, arrival=next(self._arrivals), data=data, use_prefix_cache=use_prefix_cache
        )
        self.requests[ctx.request_id] = req
        self.waiting.append(req)
        return req

    def schedule(self) -> SchedulerOutput[DataT]:
        if self._pending is not None:
            raise RuntimeError(
                "schedule() called twice without update(): pass the previous step's output to update() "
                "(or commit()) first"
            )
        bm = self.block_manager
        out: SchedulerOutput[DataT] = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # Running requests first (decodes and unfinished chunked prefills), oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if not req.schedulable:  # its last token is in flight
                i += 1
                continue
            ctx = req.context
            if bm.blocks_needed(ctx.num_tokens) > bm.num_blocks:
                self._cap(req, out)
                continue
            n = min(ctx.num_tokens - ctx.num_computed_tokens, budget)
            while not bm.allocate(ctx, n):
                victim = self.running[-1]  # the newest; possibly `req` itself
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.scheduled.append(self._entry(req, n))
                budget -= n
                i += 1

        # Then waiting ones, in order, while nothing had to be preempted.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            ctx = req.context
            if bm.blocks_needed(ctx.num_tokens) > bm.num_blocks:
                self._cap(req, out)
                continue
            prefix = bm.match_prefix(ctx) if req.use_prefix_cache else None
            n = min(ctx.num_tokens - (prefix.num_tokens if prefix else 0), budget)
            if not bm.allocate(ctx, n, prefix):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self._insert_running(req)
            out.scheduled.append(self._entry(req, n))
            budget -= n

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        self._pending = out if out.scheduled else None
        return out

    def update(self, output: SchedulerOutput[DataT], sampled_token_ids: Mapping[str, int]) -> list[Request[DataT]]:
        """Record a step's results: advance the computed tokens, append each sampled token and
        cache the blocks that became full. Returns the requests that got a new token, for the
        engine's stop checks. Entries finished or aborted since `schedule()` are skipped."""
        if not output.scheduled:
            return []
        self.commit(output)
        return self.fill(output, sampled_token_ids)

    def commit(self, output: SchedulerOutput[DataT]) -> None:
        """The step is running: advance each entry's computed tokens and append a PLACEHOLDER for
        each token it will sample, so that the next step can be scheduled before the values are
        known. Blocks holding a placeholder are cached only once fill() gives its value."""
        if not output.scheduled:
            return
        if output is not self._pending:
            raise RuntimeError("commit() must get the output of the latest schedule() call, once")
        if self._unfilled is not None:
            raise RuntimeError("commit() with an earlier step's tokens still to fill(): one step runs ahead at most")
        self._pending = None
        self._unfilled = output
        for e in output.scheduled:
            req = e.request
            if req.status is not RequestStatus.RUNNING:
                continue
            ctx = req.context
            ctx.num_computed_tokens = e.start + e.num_new_tokens
            if e.samples:
                e.placeholder = ctx.num_tokens
                ctx.tokens.append(PLACEHOLDER)
            self.block_manager.cache_full_blocks(ctx)

    def fill(self, output: SchedulerOutput[DataT], sampled_token_ids: Mapping[str, int]) -> list[Request[DataT]]:
        """The committed step's sampled tokens: each takes its placeholder's place. Returns the
        requests that got a token (preempted ones included), for the engine's stop checks."""
        if not output.scheduled:
            return []
        if output is not self._unfilled:
            raise RuntimeError("fill() must get the output of the latest commit() call, once")
        self._unfilled = None
        new_token: list[Request[DataT]] = []
        for e in output.scheduled:
            req = e.request
            if not e.samples or e.placeholder < 0 or req.status is RequestStatus.FINISHED:
                continue
            try:
                req.context.tokens[e.placeholder] = sampled_token_ids[req.request_id]
            except KeyError:
                raise KeyError(
                    f"no sampled token for request {req.request_id!r}, whose entry has samples=True"
                ) from None
            new_token.append(req)
            if req.status is RequestStatus.RUNNING:
                self.block_manager.cache_full_blocks(req.context)
        return new_token

    def finish(self, request_id: str) -> Request[DataT]:
        """The engine finished the request (stop or length): release its blocks."""
        if request_id not in self.requests:
            raise KeyError(f"unknown or already finished request {request_id!r}")
        return self._remove(request_id)

    def abort(self, request_id: str) -> Request[DataT] | None:
        """Drop a request wherever it is; a no-op for one already gone."""
        return self._remove(request_id) if request_id in self.requests else None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def reset(self, num_blocks: int) -> list[Request[DataT]]:
        """The KV cache is gone (the ranks that held it were replaced by new ones with a cache of
        `num_blocks`): every unfinished request drops its blocks and waits, oldest first, to be
        recomputed from its tokens, outputs included, as after a preemption. A token still a
        placeholder belonged to a step whose result was lost: it is dropped and sampled again.
        A step scheduled or committed before the loss is forgotten. Returns the requests, oldest
        first; the prefix-cache counters carry over."""
        old = self.block_manager
        self.block_manager = BlockManager(num_blocks, old.block_size, old.enable_prefix_caching)
        self.block_manager.prefix_cache_queries = old.prefix_cache_queries
        self.block_manager.prefix_cache_hits = old.prefix_cache_hits
        self._pending = self._unfilled = None
        requests = sorted(self.requests.values(), key=lambda req: req.arrival)
        for req in requests:
            ctx = req.context
            if PLACEHOLDER in ctx.tokens:
                del ctx.tokens[ctx.tokens.index(PLACEHOLDER) :]
            ctx.block_ids = []
            ctx.num_computed_tokens = 0
            req.schedulable = True
            if req.status is RequestStatus.RUNNING:
                req.status = RequestStatus.PREEMPTED
        self.running = []
        self.waiting = deque(requests)
        return requests

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self.num_preemptions,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_total=bm.num_blocks,
            kv_cache_usage=bm.usage,
            num_cached_blocks=bm.num_cached_blocks,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate,
        )

    # ---- internals -------------------------------------------------------------------------

    @staticmethod
    def _entry(req: Request[DataT], n: int) -> ScheduledSequence[DataT]:
        ctx = req.context
        start = ctx.num_computed_tokens
        return ScheduledSequence(req, start, n, samples=start + n == ctx.num_tokens)

    def _insert_running(self, req: Request[DataT]) -> None:
        i = len(self.running)
        while i > 0 and self.running[i - 1].arrival > req.arrival:
            i -= 1
        self.running.insert(i, req)

    def _preempt(self, req: Request[DataT], out: SchedulerOutput[DataT]) -> None:
        # Its tokens, generated ones included, stay in the context; only K/V is dropped.
        self.running.remove(req)
        self.block_manager.free(req.context)
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def _cap(self, req: Request[DataT], out: SchedulerOutput[DataT]) -> None:
        self._remove(req.request_id)
        out.capped.append(req)

    def _remove(self, request_id: str) -> Request[DataT]:
        req = self.requests.pop(request_id)
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.block_manager.free(req.context)
        req.status = RequestStatus.FINISHED
        return req
