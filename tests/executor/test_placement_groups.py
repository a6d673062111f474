"""The Ray executor inside placement groups made elsewhere (issue 13): a group given as
placement_group=, the group of the actor that creates the engine (a Ray Serve replica, a Ray Data
actor), a group too small for the ranks; and the health probe serving replicas use."""

from __future__ import annotations

import os
import signal

import numpy as np
import psutil
import pytest
import torch

from llama3_dist import ConfigError, Llama3Model, TextContext
from llama3_dist.executor.ray_executor import WorkerError

pytestmark = [pytest.mark.ray]

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def load(path, devices, **kwargs) -> Llama3Model:
    return Llama3Model.from_pretrained(path, devices=devices, dtype="float32", num_kv_blocks=16, block_size=8, **kwargs)


def logits_of(model: Llama3Model) -> np.ndarray:
    out = model.execute(model.prepare_initial_token_inputs([TextContext(tokens=list(PROMPT))]))
    return torch.as_tensor(out.next_token_logits).float().numpy()


def live_placement_groups(ray) -> set[str]:
    return {p for p, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}


@pytest.fixture(scope="module")
def expected_logits(checkpoints):
    with load(checkpoints["llama"], ["cpu"]) as model:
        return logits_of(model)


def test_explicit_group_takes_rank_i_on_bundle_i_and_stays_with_its_owner(checkpoints, expected_logits, ray_local):
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([{"CPU": 0.5}] * 3)  # a spare bundle past the ranks is left alone
    ray_local.get(pg.ready())
    try:
        with load(checkpoints["llama"], ["cpu", "cpu"], placement_group=pg) as model:
            ex = model.executor
            assert [n["placement_group_id"] for n in ex.nodes] == [pg.id.hex()] * 2
            assert ex.placement_group.id == pg.id
            np.testing.assert_allclose(logits_of(model), expected_logits, atol=1e-4, rtol=1e-4)
        assert pg.id.hex() in live_placement_groups(ray_local), "the executor removed a group it does not own"
    finally:
        remove_placement_group(pg)


def test_engine_inside_an_actor_uses_the_actors_group(checkpoints, expected_logits, ray_local):
    """As in a Serve replica with placement_group_bundles: the actor sits in bundle 0 beside rank 0
    (bundle 0 holds both), rank 1 takes bundle 1; no second group is reserved."""
    import sys

    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # Ray's workers cannot import this test module: ship its functions by value.
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    class EngineOwner:
        def run(self, path):
            import ray

            with load(path, ["cpu", "cpu"]) as model:
                return (
                    ray.get_runtime_context().get_placement_group_id(),
                    [n["placement_group_id"] for n in model.executor.nodes],
                    logits_of(model),
                    len(live_placement_groups(ray)),
                )

    pg = placement_group([{"CPU": 0.75}, {"CPU": 0.5}])
    ray_local.get(pg.ready())
    groups_before = len(live_placement_groups(ray_local))
    try:
        owner = (
            ray_local.remote(EngineOwner)
            .options(
                num_cpus=0.25,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            )
            .remote()
        )
        own_group, rank_groups, logits, groups_during = ray_local.get(owner.run.remote(checkpoints["llama"]))
        assert own_group == pg.id.hex()
        assert rank_groups == [pg.id.hex()] * 2
        assert groups_during == groups_before, "a second placement group was reserved"
        np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=1e-4)
        ray_local.kill(owner)
    finally:
        remove_placement_group(pg)


def test_group_too_small_is_refused_naming_what_is_needed(checkpoints, ray_local):
    from ray.util.placement_group import placement_group, remove_placement_group

    few = placement_group([{"CPU": 0.5}])
    small = placement_group([{"CPU": 0.5}, {"CPU": 0.25}])
    ray_local.get([few.ready(), small.ready()])
    try:
        with pytest.raises(ConfigError, match=r"has 1 bundle\(s\) .* need 2, one per rank, each with CPU=0.5"):
            load(checkpoints["llama"], ["cpu", "cpu"], placement_group=few)
        with pytest.raises(ConfigError, match=r"bundle 1 of the placement group .* too small for rank 1.*CPU=0.5"):
            load(checkpoints["llama"], ["cpu", "cpu"], placement_group=small)
        with pytest.raises(ConfigError, match=r"placement_group must be 'auto', 'new' or a .*PlacementGroup"):
            load(checkpoints["llama"], ["cpu", "cpu"], placement_group="mine")
        # The same group fits once the ranks ask for less.
        with load(checkpoints["llama"], ["cpu", "cpu"], placement_group=small, cpus_per_rank=0.25) as model:
            assert [n["placement_group_id"] for n in model.executor.nodes] == [small.id.hex()] * 2
    finally:
        remove_placement_group(few)
        remove_placement_group(small)


def test_health_check_finds_a_dead_rank_while_idle(checkpoints, ray_local):
    with load(checkpoints["llama"], ["cpu", "cpu"]) as model:
        ex = model.executor
        ex.check_health(timeout_s=10)
        logits_of(model)
        # ray.kill only asks for the kill: a ping sent at once could still be answered (seen in
        # CI). The process is gone once psutil's wait returns.
        pid = ex.nodes[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        psutil.Process(pid).wait(timeout=60)
        with pytest.raises(WorkerError, match=r"rank 1 .* died during health check"):
            ex.check_health(timeout_s=10)
        with pytest.raises(WorkerError, match=r"failed earlier \(rank 1 .* died during health check"):
            logits_of(model)
