"""AsyncLLMEngine: the synchronous LLMEngine behind one thread, for asyncio callers (the server).

    handlers (event loop) --commands: add / abort / stop (queue.SimpleQueue)--> engine thread
    engine thread: drain commands, engine.step(), per-request outputs --call_soon_threadsafe--> asyncio.Queue

The engine is not thread-safe, so exactly one thread (started here) touches it. The thread blocks
on the command queue while the engine is idle and steps while it has work. Each request's
outputs go to the asyncio.Queue given with it (several requests may share one queue: a
completions call with several prompts).

A rank that fails is replaced by LLMEngine's self-healing (LLMEngine.recover): during a step, or,
while the engine is idle, found by a health ping of every rank each health_check_interval_s;
open requests carry on where they stopped. While the ranks are rebuilt `recovering` says why (the
server's /health answers 503 with it). If the engine cannot heal (its restart budget spent) or
fails otherwise, it is dead: every open request receives an EngineDeadError, new requests are
refused, and `error` says why.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .core.grammar import grammar_key
from .engine import EngineStats, LLMEngine
from .executor import WorkerError
from .outputs import RequestOutput
from .request_metrics import RequestMetrics, RequestTiming
from .sampling_params import PoolingParams, SamplingParams

logger = logging.getLogger("llama3_dist.async_engine")


class EngineDeadError(RuntimeError):
    """The engine thread failed (or was shut down); the server must be restarted."""


@dataclass(slots=True)
class _Stream:
    """The driver-side record of one engine request: where its outputs go, and its timings."""

    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    timing: RequestTiming
    num_prompt_tokens: int = 0
    final_only: bool = False  # deliver only the finished output (a non-streaming caller)


@dataclass(slots=True)
class AddRequest:
    """Engine thread, please queue this request; settle `accepted` once done (or refused)."""

    request_id: str
    prompt: str | None
    params: SamplingParams | PoolingParams
    prompt_token_ids: list[int] | None
    stream: _Stream
    accepted: asyncio.Future


@dataclass(slots=True)
class AbortRequest:
    request_id: str


@dataclass(slots=True)
class Stop:
    """Fail every open request and end the engine thread."""


@dataclass(slots=True)
class Fail:
    """The engine is dead (a health check found a rank gone): fail every open request, refuse new ones."""

    why: str


@dataclass(slots=True)
class Heal:
    """A health check found a rank of `executor` gone: rebuild the ranks (unless a failed step has
    already replaced that executor)."""

    executor: object
    fault: BaseException


Command = AddRequest | AbortRequest | Stop | Fail | Heal

DEFAULT_HEALTH_CHECK_INTERVAL_S = 5.0


class AsyncLLMEngine:
    """Owns an LLMEngine on a background thread. Create and use it from one event loop."""

    def __init__(
        self,
        engine: LLMEngine,
        health_check_interval_s: float = DEFAULT_HEALTH_CHECK_INTERVAL_S,
        health_check_timeout_s: float = 10.0,
    ):
        """health_check_interval_s: how often the idle engine pings its ranks, so that a dead
        rank is found (and replaced) before the next request needs it."""
        if health_check_interval_s <= 0 or health_check_timeout_s <= 0:
            raise ValueError(
                f"health_check_interval_s and health_check_timeout_s must be > 0, got "
                f"{health_check_interval_s} and {health_check_timeout_s}"
            )
        self.engine = engine
        self.health_check_interval_s = health_check_interval_s
        self.health_check_timeout_s = health_check_timeout_s
        self.error: str | None = None  # why the engine died, once it has
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stats: EngineStats = engine.stats()
        self.metrics = RequestMetrics()  # written by the engine thread
        self._thread = threading.Thread(target=self._run, name="llama3-dist-engine", daemon=True)
        self._thread.start()

    # --- the event-loop side ----------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def recovering(self) -> str | None:
        """Why the ranks are being rebuilt right now, else None."""
        return self.engine.recovering

    @property
    def model_path(self) -> str:
        return self.engine.model_path

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_seq_len

    @property
    def tokenizer(self):
        """The engine's tokenizer (None if the checkpoint has none). Not thread-safe: a caller on
        another thread than the engine's takes a copy."""
        return self.engine.tokenizer

    @property
    def tokenizer_shared(self) -> bool:
        return True  # the engine thread detokenizes with it

    def replica_stats(self) -> dict[str, EngineStats]:
        """One engine, no replicas (the Ray Serve client has several)."""
        return {}

    def stats(self) -> EngineStats:
        """The engine's counters as of its last step (a snapshot; never blocks on a step)."""
        return self._stats

    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams | PoolingParams,
        prompt_token_ids: list[int] | None,
        out: asyncio.Queue,
        arrival_time: float | None = None,
        final_only: bool = False,
    ) -> None:
        """Queues a request whose outputs go to `out` (each step's cumulative output, or with
        final_only just the finished one); returns once the engine has accepted it. The engine's
        ValueError for bad input is raised here. A caller cancelled while waiting must still call
        abort(request_id) (abort is always safe)."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine is not running: {self.error or 'its thread has stopped'}")
        spec = params.structured_outputs if isinstance(params, SamplingParams) else None
        if spec is not None:
            # Compiled on the grammar compiler's threads before the engine's thread sees it (there
            # add_request finds it cached), so no step waits for a compile; a bad schema raises
            # GrammarError (a ValueError) here.
            await asyncio.wrap_future(self.engine.grammar_compiler().compile_async(grammar_key(spec)))
        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        stream = _Stream(
            out,
            loop,
            RequestTiming(arrival_time or time.monotonic()),
            num_prompt_tokens=len(prompt_token_ids) if prompt_token_ids else 0,
            final_only=final_only,
        )
        self._commands.put(AddRequest(request_id, prompt, params, prompt_token_ids, stream, accepted))
        await accepted

    async def check_health(self, timeout_s: float = 10.0) -> None:
        """Raises EngineDeadError if the engine is dead. Pings every rank (on a thread, off the
        event loop); a rank that is dead or silent past timeout_s makes the engine rebuild its
        ranks (self-healing), and the check passes while it does: the engine fails it only once
        it cannot heal."""
        if not self.is_alive:
            raise EngineDeadError(f"the engine is not running: {self.error or 'its thread has stopped'}")
        if self.engine.recovering is not None:
            return
        executor = self.engine.executor
        try:
            await asyncio.to_thread(executor.check_health, timeout_s)
        except WorkerError as e:
            self._commands.put(Heal(executor, e))
        except Exception as e:
            why = f"health check failed: {type(e).__name__}: {e}"
            self._commands.put(Fail(why))
            raise EngineDeadError(why) from e

    def abort(self, request_id: str) -> None:
        """Drops the request and frees its KV blocks; thread-safe, unknown ids are ignored."""
        self._commands.put(AbortRequest(request_id))

    async def generate(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams | PoolingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative outputs; leaving early (or being cancelled) aborts it."""
        out: asyncio.Queue = asyncio.Queue()
        finished = False
        try:
            await self.add_request(request_id, prompt, params, prompt_token_ids, out)
            while not finished:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stops the thread (open requests get EngineDeadError) and shuts the engine down."""
        if self._thread.is_alive():
            self._commands.put(Stop())
            self._thread.join(timeout)
        if self.engine is not None:
            self.engine.shutdown()

    # --- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                busy = self.error is None and engine.has_unfinished_requests()
                commands: list[Command] = []
                if not busy:  # idle: sleep until there is something to do, pinging the ranks now and then
                    try:
                        commands.append(self._commands.get(timeout=self.health_check_interval_s))
                    except queue.Empty:
                        self._ping_ranks()
                        continue
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                for command in commands:
                    if isinstance(command, Stop):
                        self._fail_all("the server is shutting down")
                        return
                    if isinstance(command, Fail):
                        if self.error is None:
                            self._die(command.why)
                        continue
                    if isinstance(command, Heal):
                        if self.error is None and command.executor is engine.executor:
                            self._heal(command.fault)
                        continue
                    self._command(command)
                if self.error is None and engine.has_unfinished_requests():
                    try:
                        outputs = engine.step()
                    except Exception as e:  # healing failed or gave up, or a bug: nothing more can run
                        logger.exception("engine step failed; the engine is dead")
                        self._die(f"{type(e).__name__}: {e}")
                        continue
                    self._deliver(outputs)
                    self._stats = engine.stats()
        except BaseException as e:  # never leave a handler waiting on a thread that is gone
            self._die(f"the engine thread stopped: {type(e).__name__}: {e}")
            raise

    def _ping_ranks(self) -> None:
        """The idle engine's health check: a rank found dead is replaced now, not at the next request."""
        if self.error is not None or self.engine.has_unfinished_requests():
            return
        try:
            self.engine.check_health(self.health_check_timeout_s)
        except WorkerError as e:
            self._heal(e)
        except Exception as e:
            self._die(f"health check failed: {type(e).__name__}: {e}")

    def _heal(self, fault: BaseException) -> None:
        try:
            self.engine.recover(fault)
        except Exception as e:
            logger.error("the engine cannot heal: %s", e)
            self._die(f"{type(e).__name__}: {e}")
        self._stats = self.engine.stats()

    def _command(self, command: AddRequest | AbortRequest) -> None:
        if isinstance(command, AbortRequest):
            if self._streams.pop(command.request_id, None) is not None and self.error is None:
                self.engine.abort_request(command.request_id)
                self._stats = self.engine.stats()
            return
        stream, accepted = command.stream, command.accepted
        if self.error is not None:
            stream.loop.call_soon_threadsafe(_settle, accepted, EngineDeadError(f"the engine is dead: {self.error}"))
            return
        try:
            self.engine.add_request(
                command.request_id, command.prompt, command.params, prompt_token_ids=command.prompt_token_ids
            )
        except Exception as e:  # bad input: refused before the engine holds anything
            stream.loop.call_soon_threadsafe(_settle, accepted, e)
            return
        self._streams[command.request_id] = stream
        self._stats = self.engine.stats()
        self.metrics.accepted(stream.num_prompt_tokens)
        stream.loop.call_soon_threadsafe(_settle, accepted, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list] = {}  # one wake-up per loop per step, not per request
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted while this step ran
                continue
            self.metrics.observe(stream.timing, out, now)
            if out.finished:
                del self._streams[out.request_id]
            elif stream.final_only:
                continue
            batches.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _die(self, why: str) -> None:
        self.error = why
        self._fail_all(f"the engine is dead: {why}")

    def _fail_all(self, why: str) -> None:
        for _rid, stream in list(self._streams.items()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, EngineDeadError(why))
        self._streams.clear()


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled meanwhile
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
