"""RayExecutor: one Worker actor per device, tensor-parallel over torch.distributed.

Start-up, in order, each step failing with a clear error before the next:
  1. check the devices (all "cpu" or all CUDA) and connect to Ray: the running instance, else
     `address=` / RAY_ADDRESS, else a local instance started here (and stopped at close);
  2. check the cluster has the GPUs asked for, then place the ranks: rank i on bundle i of the
     placement group this process runs in (a Ray Serve replica, a Ray Data actor, a user's actor),
     or of one given as `placement_group=`, or of a group reserved here (one bundle per rank),
     waiting for it at most `placement_timeout_s`;
  3. start the actors; rank 0 opens a TCPStore on a port the kernel picks (never a fixed one) at
     127.0.0.1 when every rank shares a node, else at its node's IP; every rank joins the
     process group (gloo on CPU, NCCL on CUDA) and loads its shard;
  4. compile the step into a Ray Compiled Graph (falls back to plain actor calls if that fails).

A step goes to every rank once (the graph's input channel, or one ray.put for plain calls)
and only rank 0's output comes back. The graph is the default: its per-step fan-out costs a
fraction of plain actor calls' (benchmarks/tp_overhead.py; figures in benchmarks/results/).
Its channels wait by spinning (Ray 2.60's ReadAcquire yields in a loop), so where the ranks
share a few CPU cores with the driver, that spinning takes their time: see driver_nice.

Any failure of a rank (an exception in a step, a dead or OOM-killed actor, a collective that
timed out) fails the executor for good: the tensor-parallel group is out of step, so every
later call raises at once. close() (or leaving a `with` block, or the finalizer at garbage
collection and interpreter exit) kills the actors and removes the placement group if this
executor reserved it (a group it was given or runs in belongs to its owner).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ConfigError, Llama3Config
from ..core.step_input import StepInput
from . import FinishedStep, WorkerError
from .ray_worker import RayWorker
from .worker import StepOutput

log = logging.getLogger(__name__)

STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")
DEFAULT_CPUS_PER_CPU_RANK = 0.5  # several CPU ranks fit on a small machine
DEFAULT_CPUS_PER_GPU_RANK = 1.0
DRIVER_NICE_FOR_CPU_RANKS = 10
DEFAULT_CPU_PLACEMENT_TIMEOUT_S = 60.0
DEFAULT_GPU_PLACEMENT_TIMEOUT_S = 600.0


def check_ray_gpu_devices(devices: list[str]) -> None:
    """On the Ray path Ray picks the physical GPU of each rank (one per bundle), so GPU numbers
    can only name ranks: "cuda" entries, or cuda:0 .. cuda:N-1 in order. Anything else is refused
    rather than silently ignored."""
    numbers = [d.split(":", 1)[1] for d in devices if ":" in d]
    if numbers and numbers != [str(i) for i in range(len(devices))]:
        raise ConfigError(
            f"devices {devices}: with Ray, each rank gets the GPU Ray assigns it, so GPU numbers cannot "
            f"choose GPUs; give ['cuda'] * {len(devices)} (or cuda:0 .. cuda:{len(devices) - 1}), and to use "
            f"particular GPUs of a machine set CUDA_VISIBLE_DEVICES before Ray starts (or `ray start --num-gpus`)"
        )


class PlacementError(RuntimeError):
    """The cluster could not hold the placement group asked for in time."""


class _OwnedRay:
    """The Ray connection this process made for its executors; shut down when the last closes.
    A Ray that something else initialised is used and never shut down here."""

    lock = threading.Lock()
    users = 0

    @classmethod
    def acquire(cls, address: str | None, init_kwargs: dict) -> bool:
        """Connects if needed; True if this executor holds a share of a connection made here."""
        import ray

        with cls.lock:
            if ray.is_initialized():
                if cls.users:
                    cls.users += 1
                    return True
                return False
            address = address or os.environ.get("RAY_ADDRESS") or None
            if address:
                ray.init(address=address, **init_kwargs)
            else:
                # "local", not None: plain ray.init() may try to join a dead cluster named in a stale
                # session file.
                ray.init(address="local", **{"include_dashboard": False, **init_kwargs})
            cls.users = 1
            return True

    @classmethod
    def release(cls) -> None:
        import ray

        with cls.lock:
            cls.users -= 1
            if cls.users == 0 and ray.is_initialized():
                ray.shutdown()


@dataclass
class _Resources:
    """What an executor holds in Ray; the finalizer frees it without a reference to the executor."""

    owns_ray: bool = False
    placement_group: Any = None  # ray.util.placement_group.PlacementGroup
    owns_placement_group: bool = False  # reserved here: removed at close
    actors: list = field(default_factory=list)  # RayWorker actor handles, rank order
    graph: Any = None  # the compiled graph (ray.dag.CompiledDAG), if one runs the steps
    failed: bool = False


def _release(res: _Resources) -> None:
    import ray

    try:
        if ray.is_initialized():
            if res.graph is not None and not res.failed:
                try:
                    res.graph.teardown()
                except Exception as e:
                    log.debug("compiled graph teardown: %s", e)
            for actor in res.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception as e:
                    log.debug("kill: %s", e)
            if res.graph is not None and res.failed:
                # Killed first: a rank stuck in a collective would hold teardown for its timeout.
                # Ray logs every dead actor it cannot cancel; they were killed on purpose.
                dag_log = logging.getLogger("ray.dag.compiled_dag_node")
                level = dag_log.level
                dag_log.setLevel(logging.CRITICAL)
                try:
                    res.graph.teardown()
                except Exception as e:
                    log.debug("compiled graph teardown: %s", e)
                finally:
                    dag_log.setLevel(level)
            if res.placement_group is not None and res.owns_placement_group:
                from ray.util.placement_group import remove_placement_group

                try:
                    remove_placement_group(res.placement_group)
                except Exception as e:
                    log.debug("remove placement group: %s", e)
    finally:
        res.actors, res.graph, res.placement_group = [], None, None
        if res.owns_ray:
            res.owns_ray = False
            _OwnedRay.release()


class RayExecutor:
    """One Worker actor per entry of config.devices, rank i on devices[i].

    address: the Ray cluster to join (else RAY_ADDRESS, else a local instance started here);
        ignored when this process is already connected to Ray.
    placement_strategy: PACK (default), STRICT_PACK, SPREAD or STRICT_SPREAD.
    cpus_per_rank: the CPU share of each bundle (default 0.5 for "cpu" ranks, 1 beside each GPU);
        each rank runs max(1, int(cpus_per_rank)) torch threads.
    placement_timeout_s: how long to wait for the placement group before giving up.
    collective_timeout_s: torch.distributed timeout for the rendezvous and every collective.
    step_timeout_s: the longest a step may take before the driver gives up (None: no limit; dead
        actors and failed ranks are reported as soon as Ray sees them either way).
    compiled_graph: True (required), False (plain actor calls) or None (try, else plain calls).
    driver_nice: the niceness (0-19, higher = lower CPU priority) this driver process takes if its
        own is lower. The compiled graph's driver waits for each step by spinning; where CPU ranks
        share this node's cores, that spin takes their time. By default (None) the driver takes
        DRIVER_NICE_FOR_CPU_RANKS then (benchmarks/results/cpu-throughput.log has the TP=2 runs
        with and without) and keeps its priority otherwise; 0 never changes it. An unprivileged
        process cannot take a lowered priority back.
    ray_init_kwargs: extra ray.init arguments when this executor connects or starts Ray.
    placement_group: where the ranks go. "auto" (default): the placement group this process runs
        in, if any (a Ray Serve replica with placement_group_bundles, a Ray Data actor, an actor
        scheduled into a group), else one reserved here; a PlacementGroup: that one; "new": always
        one reserved here. Rank i takes bundle i of a given or current group, which needs at least
        one bundle per rank with the rank's resources (1 GPU for CUDA ranks, cpus_per_rank CPUs);
        bundles past the last rank are left alone. Such a group is never removed here.
    """

    def __init__(
        self,
        config: Llama3Config,
        checkpoint_path: str,
        worker_kwargs: dict | None = None,
        *,
        address: str | None = None,
        placement_strategy: str | None = None,
        cpus_per_rank: float | None = None,
        placement_timeout_s: float | None = None,
        collective_timeout_s: float = 120.0,
        step_timeout_s: float | None = None,
        compiled_graph: bool | None = None,
        driver_nice: int | None = None,
        ray_init_kwargs: dict | None = None,
        placement_group: Any = "auto",
    ):
        import ray
        from ray.util.placement_group import PlacementGroup, get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.config = config
        self.world_size = tp = config.tp_degree
        self.step_timeout_s = step_timeout_s
        if driver_nice is not None and not 0 <= driver_nice <= 19:
            raise ConfigError(f"driver_nice must be a niceness from 0 to 19, got {driver_nice}")
        kinds = {d.split(":")[0] for d in config.devices}
        if len(kinds) > 1:
            raise ConfigError(
                f"devices {config.devices} mix CPU and CUDA ranks; one tensor-parallel group runs on one kind of device"
            )
        self.device_kind = kinds.pop()
        on_gpu = self.device_kind == "cuda"
        if on_gpu:
            check_ray_gpu_devices(config.devices)
        # GPU ranks of one group on one node by default: a group spread over nodes all-reduces
        # every layer over the network. CPU ranks pack loosely (they may share a node's cores).
        strategy = str(placement_strategy or ("STRICT_PACK" if on_gpu else "PACK")).upper()
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown placement_strategy {placement_strategy!r}; use one of {', '.join(STRATEGIES)}")
        if placement_timeout_s is None:  # an autoscaler may need minutes to launch a GPU node
            placement_timeout_s = DEFAULT_GPU_PLACEMENT_TIMEOUT_S if on_gpu else DEFAULT_CPU_PLACEMENT_TIMEOUT_S
        cpus = (
            cpus_per_rank
            if cpus_per_rank is not None
            else (DEFAULT_CPUS_PER_GPU_RANK if on_gpu else DEFAULT_CPUS_PER_CPU_RANK)
        )
        if cpus <= 0 and not on_gpu:
            raise ConfigError(f"cpus_per_rank must be > 0 for CPU ranks, got {cpus_per_rank}")
        self.bundle = {**({"CPU": float(cpus)} if cpus > 0 else {}), **({"GPU": 1.0} if on_gpu else {})}
        if not (isinstance(placement_group, PlacementGroup) or placement_group in ("auto", "new")):
            raise ConfigError(
                f"placement_group must be 'auto', 'new' or a ray.util.placement_group.PlacementGroup, "
                f"got {placement_group!r}"
            )
        if on_gpu and not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS")):
            # About to start a local Ray: this machine's GPUs are all there will be.
            found = torch.cuda.device_count()
            if found < tp:
                raise ConfigError(
                    f"devices {config.devices} ask for {tp} CUDA GPUs, but this machine has "
                    f"{found}; use devices=['cpu'] * {tp} or join a cluster with GPUs (address=)"
                )

        self._res = _Resources()
        self._finalizer = weakref.finalize(self, _release, self._res)
        self._res.owns_ray = _OwnedRay.acquire(address, dict(ray_init_kwargs or {}))
        try:
            if on_gpu:
                gpus = ray.cluster_resources().get("GPU", 0)
                if gpus < tp and (self._res.owns_ray or _started_here()):  # a local Ray: no node will join
                    raise ConfigError(
                        f"devices {config.devices} ask for {tp} GPUs, but the Ray cluster has "
                        f"{gpus:g}; use devices=['cpu'] * {tp} or add GPU nodes"
                    )
                if gpus < tp:  # a cluster's autoscaler may add GPU nodes: wait for the placement group
                    log.warning(
                        "the Ray cluster has %g GPUs now and %d ranks need one each; waiting up to %g s "
                        "for the placement group (an autoscaler may add GPU nodes)",
                        gpus,
                        tp,
                        placement_timeout_s,
                    )
            if placement_group == "auto":
                placement_group = get_current_placement_group() or "new"
            if placement_group == "new":
                pg = self._reserve(strategy, placement_timeout_s)
            else:
                pg = self._adopt(placement_group, placement_timeout_s)
            self._start(
                config,
                checkpoint_path,
                worker_kwargs or {},
                pg,
                collective_timeout_s,
                PlacementGroupSchedulingStrategy,
                placement_timeout_s,
            )
            self._graph_setup(compiled_graph)
            self._lower_driver_priority(driver_nice)
        except BaseException:
            self.close()
            raise

    # --- start-up -------------------------------------------------------------------------
    def _reserve(self, strategy: str, timeout_s: float):
        """A placement group of one bundle per rank, reserved here and removed at close."""
        import ray
        from ray.util.placement_group import placement_group

        tp = self.world_size
        bundles = [dict(self.bundle) for _ in range(tp)]
        pg = placement_group(bundles, strategy=strategy, name=f"llama3-dist-{os.getpid()}-{id(self):x}")
        self._res.placement_group, self._res.owns_placement_group = pg, True
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            raise PlacementError(
                f"could not reserve {tp} bundles of {self.bundle} ({strategy}) within {timeout_s:g} s. "
                f"{_cluster_summary()}. Free those resources (another job or actor may hold them), lower "
                f"cpus_per_rank, choose a looser placement_strategy, or raise placement_timeout_s."
            )
        return pg

    def _adopt(self, pg, timeout_s: float):
        """A group made elsewhere (this process's own, or given): rank i takes bundle i, so the
        first world_size bundles must each hold a rank's resources. Checked before any actor
        starts; never removed here."""
        import ray

        tp = self.world_size
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            raise PlacementError(
                f"the placement group {pg.id.hex()} given to the ranks was not ready within {timeout_s:g} s. "
                f"{_cluster_summary()}"
            )
        specs = pg.bundle_specs
        need = ", ".join(f"{k}={v:g}" for k, v in self.bundle.items()) or "no resources"
        if len(specs) < tp:
            raise ConfigError(
                f"the placement group {pg.id.hex()} has {len(specs)} bundle(s) {specs}, but devices "
                f"{self.config.devices} need {tp}, one per rank, each with {need} (rank i takes bundle i); "
                f"reserve {tp} bundles, or pass placement_group='new' to reserve a group for the ranks"
            )
        for rank, spec in enumerate(specs[:tp]):
            short = {k: v for k, v in self.bundle.items() if spec.get(k, 0.0) < v}
            if short:
                raise ConfigError(
                    f"bundle {rank} of the placement group {pg.id.hex()} is {spec}, too small for rank {rank}, "
                    f"which needs {need}; give each of the first {tp} bundles at least that (bundle 0 also "
                    f"holds whatever actor created the engine), or lower cpus_per_rank"
                )
        self._res.placement_group, self._res.owns_placement_group = pg, False
        return pg

    def _start(
        self, config, checkpoint_path, worker_kwargs, pg, collective_timeout_s, pg_strategy, placement_timeout_s
    ) -> None:
        import ray

        # ping() runs in a concurrency group of its own: a health probe answers while a step runs.
        actor_cls = ray.remote(concurrency_groups={"health": 1})(RayWorker)  # type: ignore[call-overload]
        num_threads = max(1, int(self.bundle.get("CPU", 0)))
        self._res.actors = [
            actor_cls.options(
                num_cpus=self.bundle.get("CPU", 0),
                num_gpus=self.bundle.get("GPU", 0),
                max_restarts=0,
                scheduling_strategy=pg_strategy(placement_group=pg, placement_group_bundle_index=r),
            ).remote(r, self.world_size, num_threads)
            for r in range(self.world_size)
        ]
        # A timeout here: a group made elsewhere may have room on paper that its other tenants
        # (the actor that created this engine, in bundle 0) already use.
        try:
            self.nodes = self._gather([a.node_info.remote() for a in self._res.actors], "starting", placement_timeout_s)
        except WorkerError as e:
            if "took longer" not in str(e):
                raise
            raise PlacementError(
                f"the rank actors did not start within {placement_timeout_s:g} s in the bundles of placement group "
                f"{pg.id.hex()}: other tenants of the group may hold its resources. {_cluster_summary()}"
            ) from None
        one_node = len({n["node_id"] for n in self.nodes}) == 1
        host = "127.0.0.1" if one_node else self.nodes[0]["ip"]
        port = self._gather([self._res.actors[0].open_store.remote(host, collective_timeout_s)], "rendezvous")[0]
        self.rendezvous = (host, port)
        backend = "nccl" if self.device_kind == "cuda" else "gloo"
        self.ranks = self._gather(
            [
                a.init_worker.remote(
                    host,
                    port,
                    backend,
                    "127.0.0.1" if one_node else n["ip"],
                    collective_timeout_s,
                    config,
                    checkpoint_path,
                    worker_kwargs,
                )
                for a, n in zip(self._res.actors, self.nodes)
            ],
            "loading",
        )
        self.num_kv_blocks = min(r["num_kv_blocks"] for r in self.ranks)
        if self.world_size > 1:
            # The first collective after loading: a rendezvous that hangs (a firewall between
            # nodes, the wrong NCCL_SOCKET_IFNAME) fails here, within the timeout, naming it.
            try:
                self._gather(
                    [a.check_collective.remote() for a in self._res.actors], "first all-reduce", collective_timeout_s
                )
            except WorkerError as e:
                raise WorkerError(
                    f"{e}. The ranks loaded but could not all-reduce: check that the nodes reach each "
                    f"other on {backend}'s ports and that NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME name "
                    f"the interface of {self.nodes[0]['ip']}"
                ) from None

    def _graph_setup(self, compiled_graph: bool | None) -> None:
        self.compiled_graph = False
        if compiled_graph is False:
            return
        try:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as step:
                dag = MultiOutputNode([a.execute.bind(step) for a in self._res.actors])
            self._res.graph = dag.experimental_compile()
            self.compiled_graph = True
        except Exception as e:
            if compiled_graph:
                raise
            log.warning("Ray Compiled Graph setup failed (%s); falling back to plain actor calls", e)

    def _lower_driver_priority(self, driver_nice: int | None) -> None:
        import ray

        if driver_nice is None:
            here = ray.get_runtime_context().get_node_id()
            shares_cores = self.device_kind == "cpu" and any(n["node_id"] == here for n in self.nodes)
            driver_nice = DRIVER_NICE_FOR_CPU_RANKS if shares_cores and self.compiled_graph else 0
        increment = driver_nice - os.nice(0)
        if increment > 0:
            os.nice(increment)
            log.info(
                "driver process reniced to %d so that the CPU ranks on this node get the cores the "
                "compiled graph's spinning wait would take (driver_nice=0 keeps the priority)",
                driver_nice,
            )

    # --- steps ----------------------------------------------------------------------------
    # Rank 0's sampled tokens live in its actor: the other ranks' next inputs need them on the
    # driver first, so steps are not scheduled ahead.
    runs_ahead = False

    def launch(self, step: StepInput) -> FinishedStep:
        return FinishedStep(self.execute(step))

    def execute(self, step: StepInput) -> StepOutput:
        import ray

        res = self._res
        if res.failed:
            raise WorkerError(
                f"the tensor-parallel group failed earlier ({self._failure}); close the model and load it again"
            )
        if not res.actors:
            raise WorkerError("the executor is closed")
        try:
            if res.graph is not None:
                timeout = -1 if self.step_timeout_s is None else self.step_timeout_s
                outs = ray.get(res.graph.execute(step), timeout=timeout)
            else:
                ref = ray.put(step)  # one copy for every rank
                outs = self._gather([a.execute.remote(ref) for a in res.actors], "step", self.step_timeout_s)
        except WorkerError as e:
            self._fail(str(e))
            raise
        except Exception as e:
            self._fail(self._describe(e, "step"))
            raise WorkerError(f"{self._failure}; close the model and load it again") from e
        except BaseException:  # e.g. KeyboardInterrupt: the ranks may be mid-step, out of step
            self._fail("a step was interrupted")
            raise
        return outs[0]

    def _gather(self, refs: list, what: str, timeout_s: float | None = None) -> list:
        """ray.get of every rank's ref (refs[r] from rank r), raising the first failure as soon as
        it lands: the other ranks may then be stuck in a collective that will never complete."""
        import ray

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=wait)
            if not done:
                raise WorkerError(f"tensor-parallel {what} took longer than {timeout_s:g} s")
            try:
                ray.get(done[0])
            except Exception as e:
                raise WorkerError(self._describe(e, what, refs.index(done[0]))) from e
        return ray.get(refs)

    def _describe(self, e: BaseException, what: str, rank: int | None = None) -> str:
        import ray.exceptions as rex

        rank = self._rank_of(e) if rank is None else rank
        where = f"rank {rank}" if rank is not None else "a rank"
        if rank is not None and getattr(self, "nodes", None):
            where += f" (pid {self.nodes[rank]['pid']} on {self.nodes[rank]['ip']})"
        if isinstance(e, rex.RayTaskError):
            cause = e.cause if e.cause is not None else e
            return f"{where} raised during {what}: {type(cause).__name__}: {cause}"
        if isinstance(e, rex.RayActorError):
            return (
                f"{where} died during {what} (killed, out of memory or crashed): "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
            )
        if isinstance(e, (rex.GetTimeoutError, rex.RayChannelTimeoutError)):
            return f"tensor-parallel {what} took longer than step_timeout_s={self.step_timeout_s}"
        return f"{what} failed: {type(e).__name__}: {e}"

    def _rank_of(self, e: BaseException) -> int | None:
        """The rank an error came from: by actor id, else by process id (a RayTaskError raised as
        an instance of its cause keeps them only in its message)."""
        text = str(e)
        actor_id = getattr(e, "actor_id", None) or _search(r"actor_id[=:] ?([0-9a-f]{16,})", text)
        for r, a in enumerate(self._res.actors):
            if actor_id is not None and a._actor_id.hex() == actor_id:
                return r
        pid = _search(r"pid[=:] ?(\d+)", text)
        for r, n in enumerate(getattr(self, "nodes", None) or []):
            if pid is not None and str(n["pid"]) == pid:
                return r
        return None

    def _fail(self, why: str) -> None:
        self._failure = why
        self._res.failed = True

    def check_health(self, timeout_s: float = 10.0) -> None:
        """Raises WorkerError if the group failed earlier, is closed, or a rank is dead or does not
        answer a ping within timeout_s. A dead rank fails the executor for good, as in a step."""
        res = self._res
        if res.failed:
            raise WorkerError(f"the tensor-parallel group failed earlier ({self._failure})")
        if not res.actors:
            raise WorkerError("the executor is closed")
        try:
            self._gather(
                [a.ping.options(concurrency_group="health").remote() for a in res.actors], "health check", timeout_s
            )
        except WorkerError as e:
            self._fail(str(e))
            raise

    # --- introspection and lifetime -------------------------------------------------------
    def parameter_bytes(self) -> list[dict[str, int]]:
        """Each rank's parameter bytes, sharded and replicated (measured at load)."""
        return [r["parameter_bytes"] for r in self.ranks]

    @property
    def actors(self) -> list:
        return list(self._res.actors)

    @property
    def placement_group(self):
        return self._res.placement_group

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _started_here() -> bool:
    """Whether this process started the Ray it is connected to (ray.init without an address): then
    no autoscaler can add nodes. Ray keeps that on its private node object; False if it moves."""
    import ray

    node = getattr(getattr(ray, "_private", None) and ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def _search(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text)
    return m.group(1) if m else None


def _cluster_summary() -> str:
    import ray

    total = {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")}
    free = {k: v for k, v in ray.available_resources().items() if not k.startswith("node:")}
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    keep = ("CPU", "GPU")
    fmt = lambda d: ", ".join(f"{k}={d[k]:g}" for k in keep if k in d) or "nothing"  # noqa: E731
    return f"The cluster has {nodes} node(s) with {fmt(total)} in total, {fmt(free)} free"
