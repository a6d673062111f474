"""Request routers of the engine deployment (Ray Serve's request-router API).

PrefixAwareRouter sends a request to the replica most likely to hold its prompt's prefix in its
KV prefix cache (core/prefix_index.py has the index and the policy); RoundRobinRouter is the
baseline it is measured against (benchmarks/serve_routing.py). Both skip replicas that reported
a dead engine and those a request already failed on.

Serve ships this module to every deployment handle by value (cloudpickle), so it holds only the
router classes: the wire types and the registry the ingress reads live in ray_serve.py.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from llama3_dist import ray_serve
from llama3_dist.core.prefix_index import PrefixIndex, block_hashes, rank_replicas

PENDING_HASHES_KEPT = 4096  # requests between their first routing choice and being routed


class _EngineRouter(RequestRouter):
    """What both routers share: the request's token ids, replicas to avoid, stats per replica."""

    def initialize_state(self, **kwargs) -> None:
        ray_serve.register_router(self._deployment_id.app_name, self._deployment_id.name, self)

    @staticmethod
    def engine_request(pending_request: PendingRequest | None) -> Any:
        """The call's ray_serve.EngineRequest (recognised by its fields: this module's copy of the
        class would not be the caller's), or None for a control call (info, describe)."""
        if pending_request is None:
            return None
        return next((a for a in pending_request.args if hasattr(a, "prompt_token_ids")), None)

    def usable(self, candidates: list[RunningReplica], request: Any) -> list[RunningReplica]:
        """Candidates without the replicas this request already failed on and those reporting a
        dead engine (until Serve replaces them); all candidates if that leaves none."""
        avoid = set(request.exclude_replicas) if request is not None else set()
        usable = [
            r
            for r in candidates
            if r.replica_id.unique_id not in avoid and (r.routing_stats or {}).get("alive", True) is not False
        ]
        return usable or candidates

    def load(self, replica: RunningReplica) -> int:
        """Requests this router has running or queued on the replica (Serve's queue-length cache)."""
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        return {rid.unique_id: dict(r.routing_stats or {}) for rid, r in self.curr_replicas.items()}


class PrefixAwareRouter(_EngineRouter):
    """Sends a request to the replica that was sent its longest prompt prefix, unless that replica
    is more than `imbalance_threshold` requests busier than the least loaded one (then the prefix
    spreads to another replica, which the index learns too); load breaks ties."""

    def initialize_state(
        self, block_size: int = 16, imbalance_threshold: int = 8, max_blocks_per_replica: int = 1 << 16, **kwargs
    ) -> None:
        super().initialize_state(**kwargs)
        self.block_size = block_size
        self.imbalance_threshold = imbalance_threshold
        self.index = PrefixIndex(max_blocks_per_replica)
        # request_id -> its block hashes, from the first choice until routed (a request cancelled
        # before it was routed never pops its entry: the oldest go past PENDING_HASHES_KEPT)
        self._hashes: OrderedDict[str, list[int]] = OrderedDict()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        request = self.engine_request(pending_request)
        candidates = self.usable(candidate_replicas, request)
        if request is None:  # a control call (info, describe): any replica
            return [candidates]
        hashes = self._hashes.get(request.request_id)
        if hashes is None:
            hashes = self._hashes[request.request_id] = block_hashes(request.prompt_token_ids, self.block_size)
            while len(self._hashes) > PENDING_HASHES_KEPT:
                self._hashes.popitem(last=False)
        by_id = {r.replica_id.unique_id: r for r in candidates}
        tiers = rank_replicas(
            list(by_id),
            {rid: self.load(r) for rid, r in by_id.items()},
            self.index.match(hashes),
            hashes[0] if hashes else None,
            self.imbalance_threshold,
        )
        return [[by_id[rid] for rid in tier] for tier in tiers]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request = self.engine_request(pending_request)
        if request is not None:
            hashes = self._hashes.pop(request.request_id, None)
            if hashes is None:
                hashes = block_hashes(request.prompt_token_ids, self.block_size)
            self.index.insert(replica_id.unique_id, hashes)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.index.keep_only({r.replica_id.unique_id for r in replicas})

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.remove(replica_id.unique_id)


class RoundRobinRouter(_EngineRouter):
    """Each request to the next replica in turn (the baseline prefix-aware routing is measured
    against); a full replica passes the request on to the least loaded of the others."""

    def initialize_state(self, **kwargs) -> None:
        super().initialize_state()
        self._turn = 0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        candidates = sorted(
            self.usable(candidate_replicas, self.engine_request(pending_request)), key=lambda r: r.replica_id.unique_id
        )
        if not candidates:
            return []
        chosen = candidates[self._turn % len(candidates)]
        self._turn += 1
        rest = sorted((r for r in candidates if r is not chosen), key=self.load)
        return [[chosen], rest] if rest else [[chosen]]
