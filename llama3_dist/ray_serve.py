"""Ray Serve: the OpenAI-compatible API over engine replicas, with prefix-aware routing.

    build_openai_app(model, tensor_parallel_size=2, num_replicas=2) -> ray.serve.Application
    serve.run(app, route_prefix="/")   # then any OpenAI client on Serve's HTTP port

Two deployments, as ray.serve.llm has them:

    HTTP --> OpenAIIngress (FastAPI: the handlers of `llama3-dist serve`, tokenization, metrics)
               |  DeploymentHandle.generate(EngineRequest), streamed back; routed by
               |  PrefixAwareRouter (or RoundRobinRouter / Serve's power of two choices)
               v
             LLMServer replicas (each an AsyncLLMEngine; at TP>1 its rank actors sit in the
             replica's placement group: bundle 0 = the replica + rank 0, bundle i = rank i)

The ingress tokenizes, so the router sees each prompt's token ids and keys them like the engines'
prefix caches (core/prefix_index.py). A replica whose engine died (a rank gone: its health check
pings every rank) fails Serve's health check and Serve replaces it; a request that reaches a
dead engine before its first token is retried on another replica. Replicas report their engine
counters as Serve routing stats, which the ingress's /metrics shows per replica.

ray.serve.llm itself needs vLLM or SGLang to import (Ray 2.60), so no server class for it here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from .async_engine import AsyncLLMEngine, EngineDeadError
from .config import ConfigError
from .engine import EngineStats
from .outputs import RequestOutput
from .request_metrics import RequestMetrics, RequestTiming
from .sampling_params import PoolingParams, SamplingParams

log = logging.getLogger(__name__)

ENGINE_DEPLOYMENT = "LLMServer"
INGRESS_DEPLOYMENT = "OpenAIIngress"
ROUTERS = ("prefix", "round_robin", "power_of_two")
DEFAULT_ROUTING_STATS_PERIOD_S = 1.0  # how fresh the per-replica counters in /metrics are
DEFAULT_HEALTH_CHECK_PERIOD_S = 5.0
DEFAULT_HEALTH_CHECK_TIMEOUT_S = 30.0
ATTEMPTS_BEFORE_FIRST_TOKEN = 3  # replicas a request may try while none has produced a token


# ============================================================================ wire types
@dataclass(slots=True)
class EngineRequest:
    """One engine request, ingress -> replica. The router reads prompt_token_ids."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    exclude_replicas: tuple[str, ...] = ()  # replicas whose engine died under this request


@dataclass(slots=True)
class Accepted:
    """The first item of every stream: the replica's engine holds the request."""

    replica_id: str


@dataclass(slots=True)
class ServedModel:
    """What the ingress needs to know about the engines behind it."""

    model_path: str
    tokenizer_path: str
    max_model_len: int
    block_size: int


class ReplicaEngineDead(RuntimeError):
    """The replica's engine is dead; the request may go to another replica."""

    def __init__(self, replica_id: str, why: str):
        super().__init__(f"the engine of replica {replica_id} is dead: {why}")
        self.replica_id = replica_id

    def __reduce__(self):  # keeps replica_id across Ray's pickling of the exception
        return ReplicaEngineDead, (self.replica_id, str(self).split(" is dead: ", 1)[-1])


# ============================================================================ the engine replica
class LLMServer:
    """One engine replica: an AsyncLLMEngine (at TP>1 its ranks take the replica's bundles)."""

    def __init__(
        self,
        model: str,
        engine_kwargs: dict,
        health_check_timeout_s: float = DEFAULT_HEALTH_CHECK_TIMEOUT_S,
        num_threads: int | None = None,
    ):
        from .engine import LLMEngine

        if num_threads is not None:  # a CPU replica that runs the model itself: its CPUs, not the host's
            import torch

            torch.set_num_threads(num_threads)
        self.replica_id = _own_replica_id()
        self.engine = AsyncLLMEngine(LLMEngine(model, **engine_kwargs))
        self.tokenizer_path = str(engine_kwargs.get("tokenizer") or self.engine.model_path)
        self.health_check_timeout_s = health_check_timeout_s

    def info(self) -> ServedModel:
        config = self.engine.engine.config
        return ServedModel(self.engine.model_path, self.tokenizer_path, config.max_seq_len, config.kv_params.block_size)

    async def generate(self, request: EngineRequest) -> AsyncIterator[Accepted | RequestOutput]:
        """Accepted, then the request's cumulative outputs; only the newest is sent when several
        are waiting (a slow reader gets fewer, larger steps). Cancelling the stream aborts it."""
        engine = self.engine
        if not engine.is_alive:
            raise ReplicaEngineDead(self.replica_id, engine.error or "its thread has stopped")
        out: asyncio.Queue = asyncio.Queue()
        finished = False
        try:
            try:
                await engine.add_request(
                    request.request_id, request.prompt, request.params, request.prompt_token_ids, out
                )
            except EngineDeadError as e:
                raise ReplicaEngineDead(self.replica_id, str(e)) from None
            yield Accepted(self.replica_id)
            while not finished:
                items = [await out.get()]
                while not out.empty():
                    items.append(out.get_nowait())
                failure = next((i for i in items if isinstance(i, BaseException)), None)
                if failure is not None:
                    raise ReplicaEngineDead(self.replica_id, str(failure))
                newest = items[-1]
                finished = newest.finished
                yield newest
        finally:
            if not finished:
                engine.abort(request.request_id)

    async def check_health(self) -> None:
        """Serve's probe: a dead engine thread or a rank that does not answer fails it, and Serve
        replaces the replica (its placement group, and so every rank, goes with it)."""
        await self.engine.check_health(self.health_check_timeout_s)

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve polls this (request_routing_stats_period_s) and hands it to the routers, and the
        ingress shows it (/metrics, /replicas): the engine's counters, liveness, placement, and the
        wall-clock time of this report (a reader that needs counters newer than some event waits
        for a later reported_at)."""
        return {
            **dataclasses.asdict(self.engine.stats()),
            "alive": self.engine.is_alive,
            **self._placement(),  # anew each time: healing replaces the ranks
            "reported_at": time.time(),
        }

    def _placement(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        nodes = getattr(self.engine.engine.executor, "nodes", None)  # Ray ranks; else this process is rank 0
        if nodes is None:
            nodes = [
                {"pid": os.getpid(), "node_id": ctx.get_node_id(), "placement_group_id": ctx.get_placement_group_id()}
            ]
        return {
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "placement_group_id": ctx.get_placement_group_id(),
            "ranks": [{k: n[k] for k in ("pid", "node_id", "placement_group_id")} for n in nodes],
        }

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _own_replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # constructed outside Serve (tests of the class itself)
        return f"local-{os.getpid()}"


# ============================================================================ router registry
# The routers (serve_routers.py) of this process by (application, deployment): the ingress reads
# the replicas' routing stats through them for /metrics. Here, not in serve_routers.py: Serve
# ships that module to each handle by value, so a dict there would be a copy per router.
_ROUTERS: weakref.WeakValueDictionary[tuple[str, str], Any] = weakref.WeakValueDictionary()


def register_router(app_name: str, deployment_name: str, router: Any) -> None:
    _ROUTERS[(app_name, deployment_name)] = router


# ============================================================================ the ingress
class ReplicaClient:
    """The EngineClient of the ingress: requests go to the LLMServer replicas through a Serve
    deployment handle, their outputs come back as a stream per request."""

    def __init__(self, handle, served: ServedModel, tokenizer):
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self._served = served
        self._tokenizer = tokenizer
        self._streams: dict[str, tuple[Any, asyncio.Task]] = {}  # request_id -> (response stream, pump)
        self.metrics = RequestMetrics()
        self.error: str | None = None

    # --- what the server reads --------------------------------------------------------------
    @property
    def model_path(self) -> str:
        return self._served.model_path

    @property
    def max_model_len(self) -> int:
        return self._served.max_model_len

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def tokenizer_shared(self) -> bool:
        return False  # loaded for this client; the engines detokenize in their own replicas

    def _router(self) -> Any:  # a serve_routers._EngineRouter, once the first request made it
        return _ROUTERS.get((self._handle.app_name, self._handle.deployment_name))

    def replicas(self) -> dict[str, dict[str, Any]]:
        """Per running replica, what it last reported (counters, liveness, where its ranks run)."""
        router = self._router()
        return router.replica_stats() if router is not None else {}

    def replica_stats(self) -> dict[str, EngineStats]:
        names = [f.name for f in dataclasses.fields(EngineStats)]
        stats = self.replicas()
        return {
            rid: EngineStats(**{n: int(s[n]) for n in names}) for rid, s in stats.items() if all(n in s for n in names)
        }

    def stats(self) -> EngineStats:
        per_replica = list(self.replica_stats().values())
        return EngineStats(
            **{f.name: sum(getattr(s, f.name) for s in per_replica) for f in dataclasses.fields(EngineStats)}
        )

    @property
    def recovering(self) -> str | None:
        """Replicas heal on their own; the ingress serves through the others meanwhile."""
        return None

    @property
    def is_alive(self) -> bool:
        """At least one replica is running with a live engine (by this router's view)."""
        router = self._router()
        if router is None:  # the first request creates it; until then, trust Serve's start-up
            return True
        alive = [r for r in router.curr_replicas.values() if (r.routing_stats or {}).get("alive", True)]
        self.error = None if alive else "no engine replica is running (Serve is starting or replacing them)"
        return bool(alive)

    # --- requests ---------------------------------------------------------------------------
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
        if prompt_token_ids is None:  # the server always tokenizes; other callers may not
            if prompt is None or self._tokenizer is None:
                raise ValueError("give prompt_token_ids (this checkpoint has no tokenizer)")
            prompt_token_ids = list(self._tokenizer.encode(prompt))
        timing = RequestTiming(arrival_time or time.monotonic())
        request = EngineRequest(request_id, prompt, list(prompt_token_ids), params)
        stream = await self._open(request)
        self.metrics.accepted(len(prompt_token_ids))
        pump = asyncio.ensure_future(self._pump(request, stream, out, timing, final_only))
        self._streams[request_id] = (stream, pump)

    async def _open(self, request: EngineRequest, last_error: str = "no attempt"):
        """A stream from a replica whose engine took the request. A replica that fails before it
        accepts is left out of the next try (ATTEMPTS_BEFORE_FIRST_TOKEN in all); bad input
        (ValueError) goes back to the caller at once."""
        while len(request.exclude_replicas) < ATTEMPTS_BEFORE_FIRST_TOKEN:
            stream = self._stream_handle.generate.remote(request)
            try:
                accepted = await stream.__anext__()
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except Exception as e:
                cause = _cause(e)
                if isinstance(cause, ValueError):  # bad input, refused by the engine
                    raise ValueError(str(cause)) from None
                last_error = self._failed(request, cause)
                continue
            assert isinstance(accepted, Accepted)
            request.exclude_replicas += (accepted.replica_id,)  # if this one fails too, try others
            return stream
        raise EngineDeadError(f"no engine replica could serve the request ({last_error})")

    def _failed(self, request: EngineRequest, cause: BaseException) -> str:
        why = f"{type(cause).__name__}: {cause}"
        log.warning("request %s: %s; trying another replica", request.request_id, why)
        if not isinstance(cause, ReplicaEngineDead):  # the replica itself failed: count the try anyway
            request.exclude_replicas += (f"unknown-{len(request.exclude_replicas)}",)
        return why

    async def _pump(
        self, request: EngineRequest, stream, out: asyncio.Queue, timing: RequestTiming, final_only: bool
    ) -> None:
        """Moves the replica's outputs to `out`. An engine that dies before the request's first
        output sends it to another replica, so a killed rank costs the caller nothing; after the
        first output the caller gets the error (resuming a started stream is issue 14's work)."""
        delivered = False
        try:
            while True:
                try:
                    async for item in stream:
                        delivered = True
                        self.metrics.observe(timing, item, time.monotonic())
                        if item.finished or not final_only:
                            out.put_nowait(item)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    cause = _cause(e)
                    if delivered:
                        out.put_nowait(EngineDeadError(f"{type(cause).__name__}: {cause}"))
                        return
                    last_error = self._failed(request, cause)
                    stream = await self._open(request, last_error)
                    pump = asyncio.current_task()
                    assert pump is not None
                    self._streams[request.request_id] = (stream, pump)  # abort() cancels the new stream
        except asyncio.CancelledError:
            raise
        except Exception as e:  # no replica left to try
            out.put_nowait(e if isinstance(e, EngineDeadError) else EngineDeadError(f"{type(e).__name__}: {e}"))
        finally:
            self._streams.pop(request.request_id, None)

    def abort(self, request_id: str) -> None:
        entry = self._streams.pop(request_id, None)
        if entry is not None:
            stream, pump = entry
            stream.cancel()  # Serve cancels the replica's generator, whose cleanup aborts the request
            pump.cancel()


def _cause(e: BaseException) -> BaseException:
    """The replica's own exception inside Ray's wrapper, where there is one."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


@serve.ingress()
class OpenAIIngress:
    """The OpenAI routes of `llama3-dist serve` (entrypoints/openai_server.py) over the replicas."""

    async def __init__(  # type: ignore[misc]
        self, engine, served_model_name: str, api_key: str | None = None, tool_call_parser: str = "auto"
    ):
        from .tokenizer import load_tokenizer

        served: ServedModel = await engine.info.remote()
        self.client = ReplicaClient(engine, served, load_tokenizer(served.tokenizer_path))
        self.served_model_name = served_model_name
        self.api_key = api_key
        self.tool_call_parser = tool_call_parser

    def __serve_build_asgi_app__(self):
        from fastapi.responses import JSONResponse

        from .entrypoints.openai_server import build_app

        app = build_app(self.client, self.served_model_name, self.api_key, tool_call_parser=self.tool_call_parser)

        async def replicas():
            """The engine replicas: each one's counters, liveness and where its ranks run."""
            return JSONResponse({"replicas": self.client.replicas()})

        app.add_api_route("/replicas", replicas, methods=["GET"])
        return app


# ============================================================================ the application
def build_openai_app(
    model: str | os.PathLike | None = None,
    *,
    tensor_parallel_size: int = 1,
    devices: str | None = None,
    dtype: str | None = None,
    num_replicas: int = 1,
    autoscaling_config: dict | None = None,
    api_key: str | None = None,
    served_model_name: str | None = None,
    tool_call_parser: str = "auto",
    routing: str = "prefix",
    router_kwargs: dict | None = None,
    cpus_per_rank: float | None = None,
    replica_cpus: float | None = None,
    health_check_period_s: float = DEFAULT_HEALTH_CHECK_PERIOD_S,
    health_check_timeout_s: float = DEFAULT_HEALTH_CHECK_TIMEOUT_S,
    routing_stats_period_s: float = DEFAULT_ROUTING_STATS_PERIOD_S,
    max_ongoing_requests: int | None = None,
    ingress_options: dict | None = None,
    **engine_kwargs,
) -> serve.Application:
    """The OpenAI-compatible app: `num_replicas` engines (or autoscaling_config), each
    tensor-parallel over `tensor_parallel_size` devices of kind `devices` ("cuda" or "cpu";
    default cuda where this machine has one). Each replica's deployment reserves one bundle per
    rank ({"GPU": 1, "CPU": cpus_per_rank}, or {"CPU": cpus_per_rank} on CPU hosts), the first
    merged with the replica's own CPUs; at TP=1 the replica is rank 0 and runs the model itself.

    routing: "prefix" (PrefixAwareRouter; router_kwargs: imbalance_threshold, ...),
    "round_robin" or "power_of_two" (Serve's default). engine_kwargs go to LLMEngine
    (max_num_seqs, kv_cache_bytes, max_seq_len, ...). The model directory must be readable at
    the same path on every node that runs a replica. tool_call_parser: as `llama3-dist serve
    --tool-call-parser` (auto, llama3_json, hermes, none).
    """
    from pathlib import Path

    from .default_model import default_model_path
    from .entrypoints.tool_calls import resolve_parser

    resolve_parser(tool_call_parser, None)  # an unknown name fails here, before Ray starts

    if devices is None:
        import torch

        devices = "cuda" if torch.cuda.is_available() else "cpu"
    if devices not in ("cuda", "cpu"):
        raise ConfigError(f"devices must be 'cuda' or 'cpu' (every rank of a replica on one kind), got {devices!r}")
    if tensor_parallel_size < 1:
        raise ConfigError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if routing not in ROUTERS:
        raise ConfigError(f"routing must be one of {', '.join(ROUTERS)}, got {routing!r}")
    if autoscaling_config is not None and num_replicas != 1:
        raise ConfigError("give num_replicas or autoscaling_config, not both (autoscaling sets the replica count)")
    if num_replicas < 1:
        raise ConfigError(f"num_replicas must be >= 1, got {num_replicas}")
    for key in ("devices", "executor"):
        if key in engine_kwargs:
            raise ConfigError(f"{key} is set by build_openai_app (devices=, tensor_parallel_size=); drop {key}=")
    model_path = str(Path(model).resolve()) if model is not None else default_model_path()
    on_gpu = devices == "cuda"
    rank_cpus = cpus_per_rank if cpus_per_rank is not None else (1.0 if on_gpu else 0.5)
    rank_bundle = {"CPU": float(rank_cpus), **({"GPU": 1.0} if on_gpu else {})}
    if tensor_parallel_size == 1:
        # The replica is the one rank: its own resources are the rank's.
        if replica_cpus is not None:
            rank_bundle["CPU"] = float(replica_cpus)
        actor_options = {"num_cpus": rank_bundle["CPU"], "num_gpus": rank_bundle.get("GPU", 0.0)}
        bundles = [rank_bundle]
    else:
        own_cpus = replica_cpus if replica_cpus is not None else (1.0 if on_gpu else 0.25)
        actor_options = {"num_cpus": float(own_cpus), "num_gpus": 0.0}
        bundles = [{**rank_bundle, "CPU": rank_bundle["CPU"] + own_cpus}] + [dict(rank_bundle)] * (
            tensor_parallel_size - 1
        )
        engine_kwargs.update(executor="ray", cpus_per_rank=rank_cpus)
    engine_kwargs.update(devices=[devices] * tensor_parallel_size, dtype=dtype)
    from ray.serve.config import RequestRouterConfig

    from .serve_routers import PrefixAwareRouter, RoundRobinRouter

    router_class: Any = {"prefix": PrefixAwareRouter, "round_robin": RoundRobinRouter}.get(routing)
    router_options: dict[str, Any] = dict(
        request_router_kwargs={
            **({"block_size": engine_kwargs.get("block_size", 16)} if routing == "prefix" else {}),
            **(router_kwargs or {}),
        },
        request_routing_stats_period_s=routing_stats_period_s,
    )
    if router_class is not None:  # else Serve's default, power of two choices
        router_options["request_router_class"] = router_class
    router_config = RequestRouterConfig(**router_options)
    max_num_seqs = int(engine_kwargs.get("max_num_seqs", 256))
    scale: dict[str, Any] = (
        {"autoscaling_config": autoscaling_config} if autoscaling_config is not None else {"num_replicas": num_replicas}
    )
    deployment: Any = serve.deployment  # its overloads do not cover a class passed directly
    engine_deployment = deployment(LLMServer).options(
        name=ENGINE_DEPLOYMENT,
        ray_actor_options=actor_options,
        placement_group_bundles=bundles,
        placement_group_strategy="STRICT_PACK" if on_gpu else "PACK",
        # Beyond max_num_seqs a replica queues requests itself; the router's view of each queue
        # stays exact up to this bound.
        max_ongoing_requests=max_ongoing_requests or 2 * max_num_seqs,
        health_check_period_s=health_check_period_s,
        health_check_timeout_s=health_check_timeout_s,
        request_router_config=router_config,
        **scale,
    )
    ingress = deployment(OpenAIIngress).options(
        name=INGRESS_DEPLOYMENT,
        **{
            "num_replicas": 1,
            "max_ongoing_requests": 4096,
            "ray_actor_options": {"num_cpus": 0.5},
            **(ingress_options or {}),
        },
    )
    name = served_model_name or (str(model) if model is not None else "llama3-dist-default")
    num_threads = max(1, int(rank_bundle["CPU"])) if not on_gpu and tensor_parallel_size == 1 else None
    engine = engine_deployment.bind(model_path, engine_kwargs, health_check_timeout_s, num_threads)
    return ingress.bind(engine, name, api_key, tool_call_parser)


def build_app_from_args(args: dict[str, Any]) -> serve.Application:
    """Serve's application-builder form of build_openai_app, for config files and `serve run`:

        serve run llama3_dist.ray_serve:build_app_from_args model=/models/Llama-3.1-8B-Instruct \
            tensor_parallel_size=2 num_replicas=2

    or `import_path: llama3_dist.ray_serve:build_app_from_args` with `args:` in a Serve config
    (cluster/kuberay-rayservice.yaml). Values given on the command line arrive as strings: the
    numeric and boolean keyword arguments are converted; engine keywords go through as given
    (give them typed in a config file)."""
    kwargs = dict(args)
    model = kwargs.pop("model", None)
    converters: dict[str, Any] = {
        "tensor_parallel_size": int,
        "num_replicas": int,
        "max_ongoing_requests": int,
        "max_num_seqs": int,
        "max_num_batched_tokens": int,
        "max_seq_len": int,
        "kv_cache_bytes": int,
        "cpus_per_rank": float,
        "replica_cpus": float,
        "health_check_period_s": float,
        "health_check_timeout_s": float,
        "routing_stats_period_s": float,
    }
    for key, convert in converters.items():
        if isinstance(kwargs.get(key), str):
            try:
                kwargs[key] = convert(kwargs[key])
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {kwargs[key]!r}") from None
    return build_openai_app(model, **kwargs)


def run_openai_app(
    model: str | os.PathLike | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    **app_kwargs,
) -> None:
    """`llama3-dist serve --num-replicas N`: build_openai_app on Ray Serve, its HTTP proxy on
    host:port, until Ctrl-C or SIGTERM; then the application and Serve are shut down.

    address: the Ray cluster to join ("auto", "ray://...", or an address); default $RAY_ADDRESS,
    else a private Ray on this machine.
    """
    import signal
    import threading

    import ray

    from .entrypoints.openai_server import bind_socket, server_url

    app = build_openai_app(model, **app_kwargs)  # bad arguments fail before Ray starts
    with bind_socket(host, port) as probe:  # a taken port fails now, not after Ray starts; 0 picks one
        port = probe.getsockname()[1]
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="llama3-dist", route_prefix="/")
        replicas = app_kwargs.get("num_replicas", 1)
        print(f"llama3-dist: serving on Ray Serve ({replicas} replicas) at {server_url(host, port)}/v1", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        serve.shutdown()
        if started_ray:
            ray.shutdown()
