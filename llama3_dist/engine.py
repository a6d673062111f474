"""LLMEngine: requests in, RequestOutputs out, one scheduler step at a time.

    add_request -> Scheduler (continuous batching, KV blocks, prefix cache)
                -> StepInput (+ SamplingInput) -> Executor -> Worker(s): forward, sample on rank 0
                -> token ids (+ log-probabilities) -> stop checks, detokenizer -> RequestOutput

It is synchronous and single-threaded; LLM and the HTTP server drive it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import Llama3Config
from .core.detokenizer import IncrementalDetokenizer
from .core.grammar import GrammarCompiler, GrammarMatcher, PendingBitmask, grammar_key, shared_compiler
from .core.sampling_metadata import SamplingMetadata
from .core.scheduler import PLACEHOLDER, Request, RequestStatus, ScheduledSequence, Scheduler, SchedulerOutput
from .core.step_input import SamplingInput, StepInput, build_step_input
from .core.text_context import TextContext, check_tokens
from .executor import Executor, PendingStep, WorkerError, make_executor
from .outputs import CompletionOutput, LogprobsDict, RequestOutput
from .sampling_params import PoolingParams, SamplingParams
from .tokenizer import load_tokenizer

logger = logging.getLogger("llama3_dist")


@dataclass(slots=True, eq=False)
class _Sequence:
    """One of a request's n completions (the scheduler's Request.data)."""

    group: _Group
    index: int
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None
    request: Request[_Sequence] | None = None  # the scheduler's record; its context holds the tokens
    # structured outputs: where this sequence is in its grammar (it has accepted every output token)
    matcher: GrammarMatcher | None = None
    text: str = ""
    logprobs: list[LogprobsDict] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True, eq=False)
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[_Sequence] = field(default_factory=list)
    prompt_logprobs: list[LogprobsDict | None] | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    # embedding requests: how to pool, the running sum / last row of the prompt's final hidden
    # states, how many prompt positions are in it (a recomputed chunk is not counted twice)
    pooling: PoolingParams | None = None
    pooled_sum: np.ndarray | None = None
    pooled_last: np.ndarray | None = None
    pooled_tokens: int = 0
    embedding: list[float] | None = None

    def pool(self, first_position: int, rows: np.ndarray) -> None:
        skip = max(0, self.pooled_tokens - first_position)
        rows = rows[skip:]
        if len(rows) == 0:
            return
        total = rows.sum(axis=0, dtype=np.float64)
        self.pooled_sum = total if self.pooled_sum is None else self.pooled_sum + total
        self.pooled_last = rows[-1].astype(np.float64)
        self.pooled_tokens = first_position + skip + len(rows)

    def finish_embedding(self) -> None:
        assert self.pooling is not None and self.pooled_sum is not None and self.pooled_last is not None
        vector = self.pooled_sum / self.pooled_tokens if self.pooling.pooling == "mean" else self.pooled_last
        norm = float(np.linalg.norm(vector))
        self.embedding = (vector / norm if norm > 0 else vector).astype(np.float32).tolist()

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


@dataclass(slots=True)
class _InFlight:
    """A launched step: its schedule, the pending results, and where each token will be."""

    output: SchedulerOutput[_Sequence]
    pending: PendingStep
    sampling_entries: list[ScheduledSequence[_Sequence]]
    prompt_spans: list[tuple[_Sequence, int, int]]
    rows: dict[str, int]  # request id -> row of its token among the sampled ones
    # embedding requests: (sequence, first row in StepOutput.pooled_hidden, end row, first position)
    hidden_spans: list[tuple[_Sequence, int, int, int]] = field(default_factory=list)


@dataclass(slots=True)
class StepTimes:
    """Seconds summed over the engine's steps: the whole step, the executor call inside it, and
    rank 0's forward and sampling inside that. step - forward is the engine's own overhead."""

    steps: int = 0
    step: float = 0.0
    execute: float = 0.0
    forward: float = 0.0
    sample: float = 0.0


@dataclass(slots=True, frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_blocks_used: int
    kv_blocks_total: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_generated_tokens: int
    num_steps: int
    num_restarts: int = 0  # tensor-parallel groups rebuilt after a rank failed
    num_requests_retried: int = 0  # unfinished requests put back to recompute by those rebuilds
    last_recovery_ms: int = 0  # fault seen to new group ready, the last time


class EngineFailedError(RuntimeError):
    """The engine cannot run another step: its ranks failed more often than max_restarts allows,
    or a rebuilt group failed before it completed a step."""


@dataclass(slots=True)
class _Recovery:
    """What self-healing has done, and what bounds it."""

    max_restarts: int
    window_s: float
    backoff_s: float
    restart_times: list[float] = field(default_factory=list)  # monotonic times of the rebuilds
    steps_since_restart: int = 0
    num_restarts: int = 0
    num_requests_retried: int = 0
    last_seconds: float = 0.0


class LLMEngine:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        devices: list[str] | None = None,
        dtype: str | None = None,
        tokenizer: str | Path | None = None,
        max_seq_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        seed: int | None = None,
        executor: str = "auto",
        show_progress: bool = True,
        enforce_eager: bool = False,
        load_format: str = "auto",
        async_scheduling: bool | None = None,
        max_restarts: int = 3,
        restart_window_s: float = 600.0,
        restart_backoff_s: float = 1.0,
        quantization: str | None = None,
        **executor_kwargs,
    ):
        """enforce_eager: no CUDA graphs for decode steps (CPU ranks never use them).
        async_scheduling: schedule each step while the device runs the previous one (the
        default on a single CUDA device; a CPU step runs as it is launched, so it would only
        delay each token by a step there; Ray executors do not support it).
        load_format: "auto" (the checkpoint's safetensors) or "dummy" (random weights of the
        config's shapes, for benchmarks: the directory needs only config.json).
        quantization: "int8" quantizes the attention and MLP weights at load (per output channel,
        symmetric: half the bytes of bfloat16 to stream per token), "int4" / "int4-g128" in groups
        of 32 / 128 input features (4 bits, a float16 scale and offset per group: ~0.3 of
        bfloat16's bytes); None keeps them as stored (a GGUF file's quantized types stay quantized,
        in groups of 32, where the kernels run them: model/gguf.py's GROUPED_TYPES).
        max_restarts, restart_window_s, restart_backoff_s: self-healing. When a rank fails (its
        process dies, it raises in a step, a collective times out, it misses a health check) the
        engine closes the executor, builds a new one (new ranks, a fresh KV cache) and recomputes
        every unfinished request from its prompt and the tokens it has already produced, so
        greedy and seeded outputs come out as without the fault. At most max_restarts rebuilds
        in any restart_window_s seconds, each after a backoff doubling from restart_backoff_s (the
        first is immediate); past that, or when a rebuilt group fails before completing a step,
        the engine fails with EngineFailedError naming the fault. max_restarts=0: no healing."""
        if max_restarts < 0 or restart_window_s <= 0 or restart_backoff_s < 0:
            raise ValueError(
                f"max_restarts must be >= 0, restart_window_s > 0 and restart_backoff_s >= 0; got {max_restarts}, "
                f"{restart_window_s}, {restart_backoff_s}"
            )
        if model is None:
            from .default_model import default_model_path

            model = default_model_path()
        self.model_path = str(model)
        self.config = Llama3Config.from_pretrained(
            self.model_path,
            dtype=dtype,
            max_seq_len=max_seq_len,
            devices=devices,
            block_size=block_size,
            quantization=quantization,
        )
        if load_format != "dummy":
            from .model.checkpoint import open_checkpoint

            open_checkpoint(self.model_path).close()  # a missing or pickle-only checkpoint fails before any worker
        self.tokenizer = load_tokenizer(tokenizer or self.model_path)
        self.eos_token_ids = set(self.config.eos_token_ids) | _generation_eos(self.model_path)
        worker_kwargs = dict(
            num_kv_blocks=num_kv_blocks,
            kv_cache_bytes=kv_cache_bytes,
            gpu_memory_utilization=gpu_memory_utilization,
            sampler_seed=seed,
            show_progress=show_progress,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enforce_eager=enforce_eager,
            load_format=_load_format(load_format),
        )
        self._make_executor = lambda: make_executor(
            self.config, self.model_path, executor, worker_kwargs, **executor_kwargs
        )
        self.executor: Executor = self._make_executor()
        self._recovery = _Recovery(max_restarts, restart_window_s, restart_backoff_s)
        # Why the engine is rebuilding its ranks right now, else None (read by health checks on
        # other threads while the engine thread rebuilds).
        self.recovering: str | None = None
        self._shut_down = False
        self.scheduler: Scheduler[_Sequence] = Scheduler(
            self.executor.num_kv_blocks,
            block_size,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=enable_prefix_caching,
        )
        kv = self.config.kv_params
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB per device, %d tokens in all)",
            self.executor.num_kv_blocks,
            block_size,
            self.executor.num_kv_blocks * kv.bytes_per_block_per_device / 2**20,
            self.scheduler.max_tokens_in_cache,
        )
        self._groups: dict[str, _Group] = {}
        self.num_generated_tokens = 0
        self.times = StepTimes()
        wanted = self.config.devices[0].startswith("cuda") if async_scheduling is None else async_scheduling
        self.async_scheduling = bool(wanted and self.executor.runs_ahead)
        self._in_flight: _InFlight | None = None
        self._with_penalties: set[int] = set()  # ids of live sequences with penalties
        self._with_grammar: set[int] = set()  # ids of live sequences under a grammar
        self._grammars: GrammarCompiler | None = None

    # --- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | None = None,
        params: SamplingParams | PoolingParams | dict | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queues a request. Bad input raises ValueError here, before the engine holds anything.
        PoolingParams: an embedding request, its RequestOutput.embedding set when it finishes."""
        pooling = params if isinstance(params, PoolingParams) else None
        # An embedding runs as a prefill that samples one (discarded) token: the same steps.
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True) if pooling else _as_params(params)
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, list):
            prompt, prompt_token_ids = None, prompt
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("give a prompt string or prompt_token_ids")
            if self.tokenizer is None:
                raise ValueError(f"no tokenizer in {self.model_path!r}: pass prompt_token_ids instead of text")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt_token_ids]
        c = self.config
        check_tokens(f"request {request_id!r}", ids, c.vocab_size)
        if len(ids) >= c.max_seq_len:
            raise ValueError(
                f"request {request_id!r}: the prompt has {len(ids)} tokens; the context is "
                f"{c.max_seq_len} tokens and at least one must be left to generate"
            )
        if len(ids) > self.scheduler.max_tokens_in_cache:
            raise ValueError(
                f"request {request_id!r}: the prompt has {len(ids)} tokens but the KV cache holds "
                f"{self.scheduler.max_tokens_in_cache}; give the cache more memory"
            )
        if params.logit_bias and max(params.logit_bias) >= c.vocab_size:
            raise ValueError(
                f"logit_bias: token id {max(params.logit_bias)} is not in the vocabulary (ids 0 to {c.vocab_size - 1})"
            )
        spec = params.structured_outputs
        if spec is not None:
            # Compiled here unless cached: the HTTP server compiles on a thread of its own before
            # it submits, so the engine's loop finds it ready. GrammarError is a ValueError.
            self.grammar_compiler().compile(grammar_key(spec))
        group = _Group(request_id, prompt, ids, params, arrival_time=arrival_time or time.monotonic(), pooling=pooling)
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        for i in range(params.n):
            # Seeded n > 1: each completion gets its own stream, reproducibly.
            seq_params = (
                params if params.seed is None or i == 0 else params.model_copy(update={"seed": params.seed + i})
            )
            detok = (
                IncrementalDetokenizer.from_params(self.tokenizer, ids, params) if self.tokenizer is not None else None
            )
            seq = _Sequence(
                group,
                i,
                seq_params,
                detok,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            group.sequences.append(seq)
            if seq_params.has_penalties:
                self._with_penalties.add(id(seq))
            if spec is not None:
                seq.matcher = self.grammar_compiler().matcher(grammar_key(spec))  # one per sequence
                self._with_grammar.add(id(seq))
        self._groups[request_id] = group
        for seq in group.sequences:
            ctx = TextContext(
                tokens=list(ids), request_id=_seq_id(request_id, seq.index, params.n), max_length=c.max_seq_len
            )
            # prompt_logprobs and embeddings need every prompt row computed: no prefix cache.
            use_cache = params.prompt_logprobs is None and pooling is None
            seq.request = self.scheduler.add_request(ctx, data=seq, use_prefix_cache=use_cache)

    def abort_request(self, request_id: str) -> None:
        """Drops a request wherever it is and frees its KV blocks; unknown ids are ignored."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for seq in group.sequences:
            self._with_penalties.discard(id(seq))
            self._with_grammar.discard(id(seq))
            self.scheduler.abort(_seq_id(request_id, seq.index, len(group.sequences)))

    def grammar_compiler(self) -> GrammarCompiler:
        """The compiler of structured-output grammars for this engine's tokenizer (shared with
        the HTTP server in this process)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError(f"structured outputs need a tokenizer; {self.model_path!r} has none")
            eos = self.tokenizer.eos_token_id
            if eos not in self.eos_token_ids:
                eos = min(self.eos_token_ids) if self.eos_token_ids else eos
            self._grammars = shared_compiler(self.tokenizer, eos)
        return self._grammars

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    # --- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one scheduler step; returns the (cumulative) output of every request it advanced.

        With overlapped scheduling (async_scheduling) the step is only launched here, and the
        outputs returned are those of the previous step, finished while this one runs: the GPU
        never waits for this Python between decode steps. A stop is then seen one step late: the
        extra token computed for a sequence that has stopped is dropped, never reported."""
        touched: dict[str, _Group] = {}
        try:
            self._step(touched)
        except WorkerError as fault:
            self.recover(fault)
        return self._outputs(touched)

    def _step(self, touched: dict[str, _Group]) -> None:
        started = time.perf_counter()
        in_flight = self._in_flight
        if in_flight is not None and not self._may_run_ahead():
            self._complete(in_flight, touched)  # the next step needs this one's tokens on the host
            in_flight = self._in_flight = None
        out = self.scheduler.schedule()
        for req in out.capped:  # the whole cache cannot hold their next token
            capped = _sequence(req)
            self._finish(capped, "length", None, final_text=True)
            touched[capped.group.request_id] = capped.group
        launched = self._launch(out, in_flight) if out.scheduled else None
        if in_flight is not None:
            self._complete(in_flight, touched)
        self._in_flight = None
        if launched is not None:
            self.scheduler.commit(out)
            self._hold_finished_sequences(launched)
            if self._may_run_ahead():
                self._in_flight = launched
            else:
                self._complete(launched, touched)
        if launched is not None or in_flight is not None:
            self.times.steps += 1
            self.times.step += time.perf_counter() - started
            self._recovery.steps_since_restart += 1

    # --- self-healing -----------------------------------------------------------------------
    def recover(self, fault: BaseException) -> None:
        """Replaces a failed executor: closes it (every remaining rank, its placement group and
        collective group), builds a new one and puts every unfinished request back to be
        recomputed (Scheduler.reset). Raises EngineFailedError when the budget is spent or the
        group failed again before it completed a step; the engine is then unusable."""
        recovery = self._recovery
        now = time.monotonic()
        recent = [t for t in recovery.restart_times if now - t < recovery.window_s]
        why = f"{type(fault).__name__}: {fault}"
        if recovery.max_restarts == 0:
            raise EngineFailedError(f"{why} (self-healing is off: max_restarts=0)") from fault
        if len(recent) >= recovery.max_restarts:
            raise EngineFailedError(
                f"{why} (the ranks were rebuilt {len(recent)} times in the last {recovery.window_s:g} s; "
                f"max_restarts={recovery.max_restarts})"
            ) from fault
        if recovery.restart_times and recovery.steps_since_restart == 0:
            raise EngineFailedError(
                f"{why} (again, before the rebuilt ranks completed a step: the fault follows the work)"
            ) from fault
        started = time.perf_counter()
        self.recovering = f"rebuilding the ranks after a fault: {why}"
        logger.warning(
            "%s; rebuilding the ranks (restart %d of at most %d)", why, len(recent) + 1, recovery.max_restarts
        )
        try:
            self._in_flight = None
            try:
                self.executor.close()
            except Exception as e:  # half-dead group: what is left goes with the process
                logger.warning("closing the failed executor: %s: %s", type(e).__name__, e)
            if recent:
                time.sleep(recovery.backoff_s * 2 ** (len(recent) - 1))
            recovery.restart_times = [*recent, now]
            try:
                self.executor = self._make_executor()
            except Exception as e:
                raise EngineFailedError(f"{why}; rebuilding the ranks failed: {type(e).__name__}: {e}") from e
            requests = self.scheduler.reset(self.executor.num_kv_blocks)
        finally:
            self.recovering = None
        recovery.steps_since_restart = 0
        recovery.num_restarts += 1
        recovery.num_requests_retried += len(requests)
        recovery.last_seconds = time.perf_counter() - started
        logger.warning(
            "ranks rebuilt in %.1f s; %d unfinished requests recompute from their tokens",
            recovery.last_seconds,
            len(requests),
        )

    def _may_run_ahead(self) -> bool:
        """Whether the next step may be scheduled before this one's tokens are on the host:
        overlapped scheduling is on and no running request has penalties or a grammar, which need
        every earlier token's value in the next step's sampling inputs (a grammar's mask is
        computed from its matcher, which must have accepted the previous token)."""
        return self.async_scheduling and not self._with_penalties and not self._with_grammar

    def _launch(self, out: SchedulerOutput[_Sequence], in_flight: _InFlight | None) -> _InFlight:
        entries = out.scheduled
        step = build_step_input(
            [e.context for e in entries], [e.num_new_tokens for e in entries], self.config.kv_params.block_size
        )
        # Which rows get logits depends on who samples and who wants prompt logprobs.
        step.logit_rows, step.sampling, prompt_spans = self._sampling_input(entries, step.query_start_loc)
        hidden_rows, hidden_spans = self._hidden_rows(entries, step.query_start_loc)
        if hidden_spans:
            step.hidden_rows, step.normalized_hidden = hidden_rows, True
        if in_flight is not None:
            step.previous_rows = self._previous_rows(step, entries, in_flight)
        launched_at = time.perf_counter()
        try:
            pending = self.executor.launch(step)
        except BaseException as e:
            # A grammar fill still running must end before its matchers are touched again.
            bitmask = step.sampling.metadata.allowed_bitmask if step.sampling is not None else None
            failure = bitmask.failure() if isinstance(bitmask, PendingBitmask) else None
            if isinstance(e, WorkerError) and failure is not None:
                raise failure from None  # the grammar's fill failed, not the ranks: no rebuild
            raise
        self.times.execute += time.perf_counter() - launched_at
        sampling_entries = [e for e in entries if e.samples]
        rows = {e.request_id: row for row, e in enumerate(sampling_entries)}
        return _InFlight(out, pending, sampling_entries, prompt_spans, rows, hidden_spans)

    @staticmethod
    def _hidden_rows(
        entries: list[ScheduledSequence[_Sequence]], offsets: np.ndarray
    ) -> tuple[np.ndarray, list[tuple[_Sequence, int, int, int]]]:
        """The token rows whose final hidden states embedding requests pool, and their spans."""
        rows: list[np.ndarray] = []
        spans: list[tuple[_Sequence, int, int, int]] = []
        count = 0
        for i, e in enumerate(entries):
            seq = _sequence(e.request)
            if seq.group.pooling is None:
                continue
            prompt_len = len(seq.group.prompt_token_ids)
            n = min(e.num_new_tokens, prompt_len - e.start)  # prompt positions only
            if n <= 0:
                continue
            rows.append(np.arange(int(offsets[i]), int(offsets[i]) + n, dtype=np.int64))
            spans.append((seq, count, count + n, e.start))
            count += n
        return (np.concatenate(rows) if rows else np.zeros(0, np.int64)), spans

    @staticmethod
    def _previous_rows(
        step: StepInput, entries: list[ScheduledSequence[_Sequence]], in_flight: _InFlight
    ) -> np.ndarray | None:
        """For each token still a placeholder (sampled by the step in flight), its row among that
        step's sampled tokens; -1 elsewhere. None when no token waits."""
        waiting = np.flatnonzero(step.tokens == PLACEHOLDER)
        if len(waiting) == 0:
            return None
        previous = np.full(len(step.tokens), -1, dtype=np.int64)
        owner = np.searchsorted(step.query_start_loc, waiting, side="right") - 1  # entry of each token
        for position, entry in zip(waiting.tolist(), owner.tolist()):
            request_id = entries[entry].request_id
            if request_id not in in_flight.rows:
                raise RuntimeError(f"request {request_id!r} has a token that no step in flight samples")
            previous[position] = in_flight.rows[request_id]
        return previous

    def _hold_finished_sequences(self, launched: _InFlight) -> None:
        """Sequences whose last token (max_tokens, context length) is in this step are not
        scheduled again: no token past the limit is ever computed."""
        for e in launched.sampling_entries:
            req = e.request
            params = _sequence(req).params
            if req.num_output_tokens >= params.max_tokens or req.context.num_tokens >= self.config.max_seq_len:
                req.schedulable = False

    def _complete(self, in_flight: _InFlight, touched: dict[str, _Group]) -> None:
        """Waits for a launched step's results and applies them: tokens into the contexts,
        log-probabilities, stop checks."""
        waited = time.perf_counter()
        result = in_flight.pending.result()
        t = self.times
        t.execute += time.perf_counter() - waited
        t.forward += result.forward_seconds
        t.sample += result.sample_seconds
        sampled = result.sampled
        assert sampled is not None  # every engine step samples (SamplingInput is always set)
        tokens = {e.request_id: int(t) for e, t in zip(in_flight.sampling_entries, sampled.token_ids)}
        for scored, lo, hi in in_flight.prompt_spans:
            assert scored.group.prompt_logprobs is not None and result.prompt_logprobs is not None
            scored.group.prompt_logprobs.extend(lp.to_dict(self._decode_one) for lp in result.prompt_logprobs[lo:hi])
        for pooled, lo, hi, first_position in in_flight.hidden_spans:
            assert result.pooled_hidden is not None  # asked for through StepInput.hidden_rows
            pooled.group.pool(first_position, result.pooled_hidden[lo:hi])
        self.scheduler.fill(in_flight.output, tokens)
        now = time.monotonic()
        for e, lp in zip(in_flight.sampling_entries, sampled.logprobs):
            seq = _sequence(e.request)
            if seq.finish_reason is not None or e.request.status is RequestStatus.FINISHED:
                continue  # stopped a step ago, or aborted since: this token is not reported
            group = seq.group
            if group.pooling is not None:  # the prompt is through: its embedding is complete
                group.finish_embedding()
                self._finish(seq, "stop", None)
                touched[group.request_id] = group
                continue
            if group.first_token_time is None:
                group.first_token_time = now
            self.num_generated_tokens += 1
            if lp is not None:  # asked for: logprobs and cumulative_logprob were set at add_request
                assert seq.logprobs is not None and seq.cumulative_logprob is not None
                seq.logprobs.append(lp.to_dict(self._decode_one))
                seq.cumulative_logprob += lp.chosen_logprob
            self._check_stop(e.request, tokens[e.request_id])
            touched[group.request_id] = group

    def _sampling_input(
        self, entries: list[ScheduledSequence[_Sequence]], offsets: np.ndarray
    ) -> tuple[np.ndarray, SamplingInput, list[tuple[_Sequence, int, int]]]:
        """Logit rows to compute, what to sample from them, and which rows score prompt tokens."""
        rows: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[int] = []
        targets: list[int] = []
        ks: list[int] = []
        spans: list[tuple[_Sequence, int, int]] = []
        params: list[SamplingParams] = []
        prompts: list[list[int]] = []
        outputs: list[list[int]] = []
        constrained: list[int] = []  # rows (among the sampled ones) under a grammar
        matchers: list[GrammarMatcher] = []
        for i, e in enumerate(entries):
            seq = _sequence(e.request)
            group = seq.group
            start, end = int(offsets[i]), int(offsets[i + 1])
            if group.prompt_logprobs is not None and group.params.prompt_logprobs is not None and seq.index == 0:
                # Row at position p scores prompt token p+1; skip rows already scored before a preemption.
                plen = len(group.prompt_token_ids)
                first = max(e.start, len(group.prompt_logprobs) - 1)
                last = min(e.start + e.num_new_tokens, plen - 1)
                if last > first:
                    lo = len(prompt_rows)
                    for p in range(first, last):
                        prompt_rows.append(len(rows))
                        rows.append(start + p - e.start)
                        targets.append(group.prompt_token_ids[p + 1])
                        ks.append(group.params.prompt_logprobs)
                    spans.append((seq, lo, len(prompt_rows)))
            if e.samples:
                if seq.matcher is not None:
                    constrained.append(len(sample_rows))
                    matchers.append(seq.matcher)
                sample_rows.append(len(rows))
                rows.append(end - 1)
                params.append(seq.params)
                prompts.append(group.prompt_token_ids)
                outputs.append(e.request.output_token_ids)
        bitmask = None
        if matchers:  # every matcher has accepted its sequence's tokens: no step runs ahead of them
            # Filled on the grammar's thread while the ranks run the forward pass; the sampler waits
            # for it. No matcher is touched again before that: _complete accepts after the step.
            bitmask = self.grammar_compiler().fill_bitmask_async(matchers, (self.config.vocab_size + 31) // 32)
        meta = SamplingMetadata.build(params, prompts, outputs, self.eos_token_ids, constrained, bitmask)
        as_int = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
        return as_int(rows), SamplingInput(meta, as_int(sample_rows), as_int(prompt_rows), as_int(targets), ks), spans

    def _check_stop(self, req: Request, token: int) -> None:
        seq = _sequence(req)
        p = seq.params
        n_out = req.num_output_tokens
        stop_token = token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
        grammar_done = False
        if seq.matcher is not None:
            if not seq.matcher.accept(token):  # the mask allowed it, so this is a bug: say so, end cleanly
                logger.error("request %r: the grammar refused token %d: %s", req.request_id, token, seq.matcher.error())
            grammar_done = seq.matcher.stopped()  # its end of sequence accepted: the text is complete
        if (stop_token and n_out > p.min_tokens - 1) or (grammar_done and stop_token):
            reason = token if token in p.stop_token_ids else None
            self._finish(seq, "stop", reason, new_tokens=[token], stop_terminated=True)
            return
        if grammar_done:  # ended on a token that is not a stop token of this request (ignore_eos, ...)
            self._finish(seq, "stop", None, new_tokens=[token], final_text=True)
            return
        at_limit = n_out >= p.max_tokens or req.context.num_tokens >= self.config.max_seq_len
        if seq.detokenizer is not None:
            delta = seq.detokenizer.add_tokens([token], final=at_limit, check_stops=n_out >= p.min_tokens)
            seq.text += delta.text
            if delta.stop is not None:
                self._finish(seq, "stop", delta.stop)
                return
        if at_limit:
            self._finish(seq, "length", None)

    def _finish(
        self, seq: _Sequence, reason: str, stop_reason, new_tokens=(), stop_terminated=False, final_text=False
    ) -> None:
        if seq.detokenizer is not None and (stop_terminated or final_text) and not seq.detokenizer.finished:
            seq.text += seq.detokenizer.add_tokens(new_tokens, final=True, stop_terminated=stop_terminated).text
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._with_penalties.discard(id(seq))
        self._with_grammar.discard(id(seq))
        # abort, not finish: a capped request has already left the scheduler.
        self.scheduler.abort(_seq_id(seq.group.request_id, seq.index, len(seq.group.sequences)))

    def _outputs(self, touched: dict[str, _Group]) -> list[RequestOutput]:
        results = []
        for rid, group in touched.items():
            results.append(self._request_output(group))
            if group.finished:
                self._groups.pop(rid, None)
        return results

    def _request_output(self, group: _Group) -> RequestOutput:
        completions = []
        for seq in group.sequences:
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=seq.text,
                    token_ids=[] if seq.request is None else list(seq.request.output_token_ids),
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=None if seq.logprobs is None else list(seq.logprobs),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            prompt_logprobs=None if group.prompt_logprobs is None else list(group.prompt_logprobs),
            outputs=completions,
            finished=group.finished,
            embedding=group.embedding,
        )

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    # --- introspection and lifetime ---------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.scheduler.stats()
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            num_preemptions=s.num_preemptions,
            kv_blocks_used=s.kv_blocks_used,
            kv_blocks_total=s.kv_blocks_total,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            num_generated_tokens=self.num_generated_tokens,
            num_steps=self.times.steps,
            num_restarts=self._recovery.num_restarts,
            num_requests_retried=self._recovery.num_requests_retried,
            last_recovery_ms=round(self._recovery.last_seconds * 1000),
        )

    def check_health(self, timeout_s: float = 10.0) -> None:
        """Raises if the engine is shut down or a rank is dead or unresponsive (Executor.check_health);
        safe to call from another thread while steps run."""
        if self._shut_down:
            raise RuntimeError("the engine is shut down")
        self.executor.check_health(timeout_s)

    def shutdown(self) -> None:
        """Closes the executor (its workers and their memory); safe to call twice."""
        if not self._shut_down:
            self._shut_down = True
            self.executor.close()


def _load_format(value: str) -> str:
    if value not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' (the checkpoint) or 'dummy' (random weights), got {value!r}")
    return value


def _sequence(request: Request[_Sequence]) -> _Sequence:
    assert request.data is not None  # the engine adds every request with its _Sequence
    return request.data


def _seq_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


def _as_params(params) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if isinstance(params, dict):
        return SamplingParams(**params)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling params must be a SamplingParams or a dict, got {type(params).__name__}")
    return params


def _generation_eos(path: str) -> set[int]:
    import json

    file = Path(path) / "generation_config.json"
    if Path(path).suffix == ".gguf" or not file.is_file():
        return set()
    eos = json.loads(file.read_text()).get("eos_token_id")
    return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
