"""Ray Data batch inference: `build_processor(model, ...)` returns `processor(ds) -> ds`.

    ds (rows: prompt | messages [, sampling_params], any other columns)
      -> ds.map_batches(_EngineActor, actor pool of `concurrency`, `max_concurrent_batches` calls per actor)
           each actor: AsyncLLMEngine(LLMEngine(model, devices=[devices] * tensor_parallel_size))
      -> the same rows plus generated_text, generated_token_ids, num_input_tokens,
         num_generated_tokens, finish_reason, error

Each actor holds one engine. Several batches run in one actor at once and all feed that one engine,
so the engine batches rows across Ray Data batches (continuous batching): a batch does not hold the
engine idle while its slowest row finishes. At TP>1 the engine's Ray executor reserves its own
placement group from inside the actor (one bundle per rank) and the actor's __del__ removes it
(Ray Data calls it when it releases the pool); a placement group made by the driver would outlive
the pool.

A bad row (empty prompt, bad sampling params, a prompt longer than the context) gets its reason in
`error` and empty outputs; the other rows complete. An engine that dies (a rank gone, the engine
thread failed) fails the dataset with EngineDiedError naming what died.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sampling_params import SamplingParams

if TYPE_CHECKING:
    import ray.data

    from .async_engine import AsyncLLMEngine

logger = logging.getLogger("llama3_dist.ray_data")

OUTPUT_COLUMNS = (
    "generated_text",
    "generated_token_ids",
    "num_input_tokens",
    "num_generated_tokens",
    "finish_reason",
    "error",
)
INPUT_COLUMNS = ("prompt", "messages", "sampling_params")
DEVICES = ("cpu", "cuda")


class EngineDiedError(RuntimeError):
    """The engine of a Ray Data actor died; the rows it held cannot complete."""


@dataclass(frozen=True, slots=True)
class _EngineSpec:
    """What each actor builds: picklable, sent with the UDF's constructor arguments."""

    model: str | None
    devices: list[str]
    dtype: str | None
    default_params: dict[str, Any]
    chat: bool
    num_threads: int | None  # torch threads of an actor that runs the model itself (CPU, TP=1)
    output_chunk_rows: int
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


class Processor:
    """processor(ds) -> ds with the output columns added (OUTPUT_COLUMNS); made by build_processor.
    Lazy like every Ray Data transform: nothing runs until the dataset is consumed."""

    def __init__(
        self,
        spec: _EngineSpec,
        *,
        concurrency: int,
        batch_size: int,
        max_concurrent_batches: int,
        num_cpus: float,
        num_gpus: float,
    ):
        self.spec = spec
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.max_concurrent_batches = max_concurrent_batches
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        import inspect

        import ray.data

        # Twice as many tasks queued as run, as ray.data.llm does: the next batch is already in the
        # actor when one finishes, so the engine never waits for Ray Data.
        pool: dict[str, Any] = {
            "size": self.concurrency,
            "max_tasks_in_flight_per_actor": 2 * self.max_concurrent_batches,
        }
        remote_args: dict[str, Any] = {}
        # Calls running at once in one actor, each a batch feeding the same engine. Ray 2.60 takes
        # it from the pool (its max_concurrency= remote argument is deprecated); older Rays only
        # from the remote argument.
        if "max_concurrent_calls_per_actor" in inspect.signature(ray.data.ActorPoolStrategy).parameters:
            pool["max_concurrent_calls_per_actor"] = self.max_concurrent_batches
        else:
            remote_args["max_concurrency"] = self.max_concurrent_batches
        return ds.map_batches(
            _EngineActor,
            fn_constructor_kwargs={"spec": self.spec},
            batch_size=self.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(**pool),
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            **remote_args,
        )


def build_processor(
    model: str | Path | None = None,
    *,
    tensor_parallel_size: int = 1,
    devices: str | None = None,
    dtype: str | None = None,
    concurrency: int = 1,
    batch_size: int = 64,
    sampling_params: SamplingParams | dict | None = None,
    chat: bool = False,
    max_concurrent_batches: int = 4,
    num_cpus: float | None = None,
    output_chunk_rows: int = 16,
    **engine_kwargs,
) -> Processor:
    """A Ray Data processor: `processor(ds)` maps `ds` through `concurrency` actors, each one engine.

    model: a checkpoint directory every node can read (None: the embedded default model).
    tensor_parallel_size: ranks per engine; above 1 each actor starts one Ray actor per rank in a
        placement group of its own.
    devices: "cpu" or "cuda" (default: "cuda" if this machine has one, else "cpu").
    sampling_params: the default for every row; a row's `sampling_params` dict overrides fields.
    chat: render a row's `prompt` text as one user message with the chat template (rows with
        `messages` are always rendered).
    max_concurrent_batches: batches one actor runs at once, all into its one engine; keep
        batch_size * max_concurrent_batches at or above max_num_seqs (256) to fill the engine.
    num_cpus: each actor's CPU reservation (default: 1 where the actor runs the model itself,
        TP=1; 0.5 at TP>1, where the ranks reserve their own). A CPU actor at TP=1 runs
        int(num_cpus) torch threads.
    output_chunk_rows: finished rows are handed back in tables of this many as they complete.
    engine_kwargs: LLMEngine's (max_num_seqs, kv_cache_bytes, max_seq_len, ...; at TP>1 also the
        Ray executor's: cpus_per_rank, placement_strategy, ...). At TP>1 steps reach the ranks by
        plain actor calls (compiled_graph=False) unless compiled_graph=True is given: with a
        compiled graph Ray Data's graceful release of the pool never reaches the actor's __del__,
        and the engine's placement group stays until the job ends.
    """
    try:
        import ray.data  # noqa: F401  (it brings pyarrow)
    except ImportError as e:
        raise ImportError(f"Ray Data is not installed ({e}); pip install 'llama3-dist[data]'") from None
    if devices is None:
        import torch

        devices = "cuda" if torch.cuda.is_available() else "cpu"
    if devices not in DEVICES:
        raise ValueError(
            f"devices must be 'cpu' or 'cuda' (one kind for every rank; Ray assigns the GPUs), got {devices!r}"
        )
    for name, value in (
        ("tensor_parallel_size", tensor_parallel_size),
        ("concurrency", concurrency),
        ("batch_size", batch_size),
        ("max_concurrent_batches", max_concurrent_batches),
        ("output_chunk_rows", output_chunk_rows),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if "devices" in engine_kwargs:
        raise ValueError("give devices='cpu' or 'cuda' and tensor_parallel_size=N, not a list of devices")
    defaults = _default_params(sampling_params)
    if num_cpus is None:
        num_cpus = 1.0 if tensor_parallel_size == 1 else 0.5
    if num_cpus < 0 or (devices == "cpu" and tensor_parallel_size == 1 and num_cpus < 1):
        raise ValueError(
            f"num_cpus must be >= 0, and >= 1 for a CPU actor that runs the model itself (TP=1), got {num_cpus}"
        )
    on_gpu_here = devices == "cuda" and tensor_parallel_size == 1
    defaults_for_engine: dict[str, Any] = {"show_progress": False}
    if tensor_parallel_size > 1:
        # Plain actor calls, not a compiled graph: the graph's loop tasks on the ranks never end
        # on their own, and Ray waits for an exiting actor's tasks before it deletes the UDF, so
        # __del__ (which closes the engine and removes its placement group) would never run.
        defaults_for_engine["compiled_graph"] = False
    spec = _EngineSpec(
        model=None if model is None else str(model),
        devices=[devices] * tensor_parallel_size,
        dtype=dtype,
        default_params=defaults.model_dump(),
        chat=chat,
        num_threads=int(num_cpus) if devices == "cpu" and tensor_parallel_size == 1 else None,
        output_chunk_rows=output_chunk_rows,
        engine_kwargs={**defaults_for_engine, **engine_kwargs},
    )
    return Processor(
        spec,
        concurrency=concurrency,
        batch_size=batch_size,
        max_concurrent_batches=max_concurrent_batches,
        num_cpus=float(num_cpus),
        # The TP=1 engine runs its GPU in the actor; at TP>1 the ranks hold the GPUs, the actor none.
        num_gpus=1.0 if on_gpu_here else 0.0,
    )


# --- rows -----------------------------------------------------------------------------------
@dataclass(slots=True)
class _Prepared:
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams


@dataclass(slots=True)
class _Result:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    num_input_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


def _default_params(params: SamplingParams | dict | None) -> SamplingParams:
    if params is None:
        params = SamplingParams()
    elif isinstance(params, dict):
        params = _validated({}, params)
    elif not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params must be a SamplingParams or a dict, got {type(params).__name__}")
    _one_completion(params)
    return params


def _validated(base: dict[str, Any], given: dict[str, Any]) -> SamplingParams:
    """SamplingParams from base updated with given, every error named (as ValueError)."""
    from pydantic import ValidationError

    fields = SamplingParams.model_fields
    unknown = sorted(k for k in given if k not in fields)
    if unknown:
        raise ValueError(f"sampling_params: unknown field(s) {unknown}; accepted: {', '.join(fields)}")
    try:
        return SamplingParams(**{**base, **given})
    except ValidationError as e:
        raise ValueError("sampling_params: " + "; ".join(_pydantic_message(err) for err in e.errors())) from None


def _pydantic_message(err: Any) -> str:
    """One pydantic error as our validators word theirs: the field's own message where it has one
    ("temperature must be >= 0 ..."), else the field, pydantic's message and the value."""
    message = str(err.get("msg", ""))
    if message.startswith("Value error, "):
        return message.removeprefix("Value error, ")
    where = ".".join(str(part) for part in err.get("loc", ()))
    return f"{where}: {message}, got {err.get('input')!r}"


def _one_completion(params: SamplingParams) -> None:
    if params.n != 1:
        raise ValueError(f"sampling_params: n must be 1 here (one output row per input row), got {params.n}")


def _row_params(defaults: SamplingParams, base: dict[str, Any], value: Any) -> SamplingParams:
    """The row's sampling params: the processor's defaults, with the row's fields over them."""
    if value is None:
        return defaults
    if not isinstance(value, dict):
        raise ValueError(f"sampling_params must be a dict of SamplingParams fields, got {type(value).__name__}")
    # Arrow gives every row of a struct column every key some row set, as None where this row did
    # not: None means "not given" here, so a row cannot set a field to None over a default.
    params = _validated(base, {k: v for k, v in value.items() if v is not None})
    _one_completion(params)
    return params


def _conversation(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError(
            "messages must be a non-empty list of {'role': ..., 'content': ...} dicts, got "
            f"{value!r:.80}" + ("" if isinstance(value, list) else f" ({type(value).__name__})")
        )
    conversation = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a 'role' and a 'content', got {message!r:.80}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be text, got {type(content).__name__}")
        # Dropped Nones: keys that other rows' messages have (Arrow's struct unification).
        conversation.append({k: v for k, v in message.items() if v is not None} | {"content": content or ""})
    return conversation


# --- the actor ------------------------------------------------------------------------------
class _EngineActor:
    """One engine per Ray Data actor; every concurrent call (one batch each) feeds it."""

    def __init__(self, spec: _EngineSpec):
        import ray

        from .async_engine import AsyncLLMEngine
        from .engine import LLMEngine

        if spec.num_threads is not None:
            import torch

            torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.engine: AsyncLLMEngine | None = None
        self._death: str | None = None  # why the engine died, once it has
        self._defaults = SamplingParams(**spec.default_params)
        context = ray.get_runtime_context()
        actor_id = context.get_actor_id() or "driver"
        self._where = f"Ray Data actor {actor_id[:12]} (pid {os.getpid()} on {ray.util.get_node_ip_address()})"
        self._tag = f"data-{actor_id[:8]}"
        self._ids = itertools.count()
        engine = LLMEngine(spec.model, devices=spec.devices, dtype=spec.dtype, **spec.engine_kwargs)
        self.engine = AsyncLLMEngine(engine)
        self._tokenizer = engine.tokenizer
        self._model_path = engine.model_path

    def _prepare(self, row: dict[str, Any]) -> _Prepared:
        """The engine's input for one row; a bad row raises ValueError naming what is wrong."""
        params = _row_params(self._defaults, self.spec.default_params, row.get("sampling_params"))
        prompt, messages = row.get("prompt"), row.get("messages")
        if prompt is not None and messages is not None:
            raise ValueError("the row has both 'prompt' and 'messages'; give one of them")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
            if not prompt:
                raise ValueError("prompt must not be empty")
            if not self.spec.chat:
                return _Prepared(prompt, None, params)
            messages = [{"role": "user", "content": prompt}]
        elif messages is None:
            raise ValueError("the row has neither 'prompt' (text) nor 'messages' (a chat conversation); give one")
        return _Prepared(None, self._render(_conversation(messages)), params)

    def _render(self, conversation: list[dict[str, Any]]) -> list[int]:
        from .llm import apply_chat_template

        try:
            return apply_chat_template(self._tokenizer, self._model_path, conversation)
        except ValueError:
            raise
        except Exception as e:  # the template itself refuses (a role it does not know, ...)
            raise ValueError(f"the chat template could not render these messages: {type(e).__name__}: {e}") from None

    async def __call__(self, batch: Any) -> AsyncIterator[Any]:
        """Yields the batch's rows with the output columns, in tables of output_chunk_rows as they
        finish (rows with an error first); the order of rows may change."""
        from .async_engine import EngineDeadError

        engine = self._live_engine()
        rows = batch.select([c for c in INPUT_COLUMNS if c in batch.column_names]).to_pylist()
        results: dict[int, _Result] = {}
        prepared: list[tuple[int, _Prepared]] = []
        for i, row in enumerate(rows):
            try:
                prepared.append((i, self._prepare(row)))
            except ValueError as e:
                results[i] = _Result(error=str(e))
        request_ids = [f"{self._tag}-{next(self._ids)}" for _ in prepared]
        row_of = {rid: i for rid, (i, _) in zip(request_ids, prepared)}
        unfinished = set(request_ids)
        out: asyncio.Queue = asyncio.Queue()
        ready = list(results)
        try:
            # All at once: each add waits for the engine thread's next drain of its commands, so one
            # by one would cost a step per row.
            added = await asyncio.gather(
                *(
                    engine.add_request(rid, p.prompt, p.params, p.prompt_token_ids, out, final_only=True)
                    for rid, (_, p) in zip(request_ids, prepared)
                ),
                return_exceptions=True,
            )
            for rid, outcome in zip(request_ids, added):
                if isinstance(outcome, EngineDeadError):
                    raise self._died(outcome)
                if isinstance(outcome, BaseException) and not isinstance(outcome, ValueError):
                    raise outcome
                if outcome is not None:  # refused before the engine held anything: this row only
                    unfinished.discard(rid)
                    results[row_of[rid]] = _Result(error=_without_request_id(rid, str(outcome)))
                    ready.append(row_of[rid])
            while unfinished:
                items = [await out.get()]
                while not out.empty():
                    items.append(out.get_nowait())
                for item in items:
                    if isinstance(item, BaseException):
                        raise self._died(item)
                    unfinished.discard(item.request_id)
                    completion = item.outputs[0]
                    results[row_of[item.request_id]] = _Result(
                        completion.text,
                        list(completion.token_ids),
                        len(item.prompt_token_ids),
                        completion.finish_reason,
                    )
                    ready.append(row_of[item.request_id])
                if len(ready) >= self.spec.output_chunk_rows:
                    yield _table(batch, ready, results)
                    ready = []
            if ready or batch.num_rows == 0:
                yield _table(batch, ready, results)
        finally:
            for rid in unfinished:  # cancelled, or failed: free their KV blocks
                engine.abort(rid)

    def _live_engine(self) -> AsyncLLMEngine:
        if self.engine is None or not self.engine.is_alive:
            raise self._died(None)
        return self.engine

    def _died(self, cause: BaseException | None) -> EngineDiedError:
        """The error that fails the dataset; the first call (any of the batches running) records
        why and closes the engine."""
        if self._death is None:
            engine_error = self.engine.error if self.engine is not None else None
            self._death = engine_error or (str(cause) if cause is not None else "") or "the engine was shut down"
            logger.error("the engine of %s died: %s", self._where, self._death)
            # Closed now, before the error reaches Ray Data: a failing pool is killed (no __del__),
            # and the rank actors and placement group of a TP>1 engine would stay until the job ends.
            self.shutdown()
        return EngineDiedError(f"the llama3-dist engine of {self._where} died: {self._death}")

    def shutdown(self) -> None:
        """Stops the engine thread and closes the executor (at TP>1: its rank actors and its
        placement group); safe to call twice."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()

    def __del__(self) -> None:
        # Ray Data deletes the UDF when it releases the pool gracefully.
        self.shutdown()


def _without_request_id(request_id: str, message: str) -> str:
    """The engine's message without its "request 'data-..-7': " prefix: the id is internal here."""
    return message.removeprefix(f"request {request_id!r}: ")


def _table(batch: Any, rows: list[int], results: dict[int, _Result]) -> Any:
    """The given rows of the batch (every input column as it was) plus the output columns."""
    import pyarrow as pa  # type: ignore[import-untyped]

    table = batch.take(pa.array(rows, type=pa.int64()))
    table = table.drop_columns([c for c in OUTPUT_COLUMNS if c in table.column_names])
    picked = [results[i] for i in rows]
    columns = {
        "generated_text": pa.array([r.text for r in picked], type=pa.string()),
        "generated_token_ids": pa.array([r.token_ids for r in picked], type=pa.list_(pa.int64())),
        "num_input_tokens": pa.array([r.num_input_tokens for r in picked], type=pa.int64()),
        "num_generated_tokens": pa.array([len(r.token_ids) for r in picked], type=pa.int64()),
        "finish_reason": pa.array([r.finish_reason for r in picked], type=pa.string()),
        "error": pa.array([r.error for r in picked], type=pa.string()),
    }
    for name, column in columns.items():
        table = table.append_column(name, column)
    return table
