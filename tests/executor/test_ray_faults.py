"""The Ray executor's failure modes: dead and failing ranks, placement that cannot fit, cleanup
at close, and bad arguments refused before any actor starts.

The session's Ray runs without a dashboard, so actors and placement groups are read from the
GCS tables (ray._private.state.actors, ray.util.placement_group_table) rather than through
ray.util.state, which needs the dashboard's API server.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import psutil
import pytest
import torch

from llama3_dist import ConfigError, Llama3Config, Llama3Model, ReturnLogits, TextContext
from llama3_dist.executor.local import LocalExecutor
from llama3_dist.executor.ray_executor import PlacementError, RayExecutor, WorkerError
from llama3_dist.executor.ray_worker import RayWorker

pytestmark = [pytest.mark.ray]

TOL = dict(atol=1e-4, rtol=1e-4)
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def load(path, devices, **kwargs) -> Llama3Model:
    return Llama3Model.from_pretrained(path, devices=devices, dtype="float32", num_kv_blocks=16, block_size=8, **kwargs)


def alive_actors(ray) -> set[str]:
    return {a for a, info in ray._private.state.actors().items() if info["State"] != "DEAD"}


def live_placement_groups(ray) -> set[str]:
    return {p for p, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}


def assert_released(ray, pids: list[int], actor_ids: list[str], pg_id: str) -> None:
    """No actor, process or placement group of the executor is left (process exit takes a moment)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if (
            not (alive_actors(ray) & set(actor_ids))
            and not any(psutil.pid_exists(p) for p in pids)
            and pg_id not in live_placement_groups(ray)
        ):
            return
        time.sleep(0.2)
    raise AssertionError(
        f"left behind: actors {alive_actors(ray) & set(actor_ids)}, "
        f"pids {[p for p in pids if psutil.pid_exists(p)]}, "
        f"placement group {pg_id in live_placement_groups(ray)}"
    )


def handles(executor: RayExecutor):
    return (
        [n["pid"] for n in executor.nodes],
        [a._actor_id.hex() for a in executor.actors],
        executor.placement_group.id.hex(),
    )


def one_step(model: Llama3Model, tokens=PROMPT):
    return model.execute(model.prepare_initial_token_inputs([TextContext(tokens=list(tokens))]))


def test_killed_rank_mid_step_is_a_clear_error_then_a_new_model_starts(checkpoints, references, ray_local):
    path = checkpoints["llama"]
    model = load(path, ["cpu", "cpu"])
    ex = model.executor
    pids, actor_ids, pg_id = handles(ex)
    one_step(model)
    # Freeze rank 0 so that the step is surely in flight (rank 1 waits for it in the embedding's
    # all-reduce), then kill rank 1 and let rank 0 run on into a collective with a dead peer.
    os.kill(pids[0], signal.SIGSTOP)

    def kill():
        time.sleep(0.5)
        os.kill(pids[1], signal.SIGKILL)
        os.kill(pids[0], signal.SIGCONT)

    threading.Thread(target=kill, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"rank [01] \(pid \d+ on [\d.]+\) (died|raised) during step") as err:
        one_step(model, [7, 8, 9])
    assert time.monotonic() - start < 30
    assert "close the model and load it again" in str(err.value)
    with pytest.raises(WorkerError, match="failed earlier"):  # at once, not another hang
        one_step(model)
    model.close()
    assert_released(ray_local, pids, actor_ids, pg_id)

    # A new model starts in its place; a rank that raises inside a step (here rank 1 in the
    # second layer's MLP, so rank 0 waits in that MLP's all-reduce) is reported at once, through
    # plain actor calls and through the compiled graph (planted before the graph holds the actors).
    def plant_fault(rank: RayWorker) -> None:  # nested: cloudpickle sends it by value
        def boom(h):
            raise RuntimeError("planted fault")

        rank.worker.model.layers[1].mlp.forward = boom

    def planted_fault_is_reported(model: Llama3Model, compiled: bool) -> None:
        out = one_step(model)
        torch.testing.assert_close(out.logits, references("llama")(torch.tensor([PROMPT])).logits[0], **TOL)
        ray_local.get(model.executor.actors[1].__ray_call__.remote(plant_fault))
        if compiled:
            model.executor._graph_setup(True)
        start = time.monotonic()
        with pytest.raises(
            WorkerError,
            match=r"rank 1 \(pid \d+ .*\) raised during step: "
            r"RuntimeError: planted fault",
        ):
            one_step(model)
        assert time.monotonic() - start < 30

    # Plain calls, released by leaving a `with` block.
    with load(path, ["cpu", "cpu"], return_logits=ReturnLogits.ALL, compiled_graph=False) as model:
        ids = handles(model.executor)
        planted_fault_is_reported(model, compiled=False)
    assert_released(ray_local, *ids)
    # Compiled graph, dropped without close(): the executor's finalizer (which also runs at
    # interpreter exit) releases everything.
    model = load(path, ["cpu", "cpu"], return_logits=ReturnLogits.ALL, compiled_graph=False)
    ids = handles(model.executor)
    assert model.executor._finalizer.atexit
    planted_fault_is_reported(model, compiled=True)
    del model, ex, err
    gc.collect()
    assert_released(ray_local, *ids)


def test_placement_group_that_cannot_fit(checkpoints, ray_local):
    """Two ranks on two distinct nodes of a one-node cluster: refused within the timeout."""
    before_actors, before_pgs = alive_actors(ray_local), live_placement_groups(ray_local)
    start = time.monotonic()
    with pytest.raises(
        PlacementError,
        match=r"2 bundles of \{'CPU': 0.5\} \(STRICT_SPREAD\) within 2 s.*"
        r"1 node\(s\) with CPU=4 in total",
    ):
        load(checkpoints["llama"], ["cpu", "cpu"], placement_strategy="STRICT_SPREAD", placement_timeout_s=2)
    assert time.monotonic() - start < 10
    with pytest.raises(PlacementError, match=r"bundles of \{'CPU': 64.0\} \(PACK\)"):
        load(checkpoints["llama"], ["cpu", "cpu"], cpus_per_rank=64, placement_timeout_s=1)
    # Nothing of its own left; an earlier test's actor may finish exiting meanwhile (seen in CI).
    assert alive_actors(ray_local) <= before_actors
    assert live_placement_groups(ray_local) <= before_pgs


@pytest.mark.parametrize(
    "devices,kwargs,message",
    [
        (["cpu"] * 3, {}, r"tensor-parallel degree 3 does not divide the heads \(4 query heads, 2 KV heads\)"),
        (["cpu", "tpu:0"], {}, r"unknown device 'tpu:0'"),
        (["cuda:0", "cuda:1"], {}, r"ask for 2 GPUs, but the Ray cluster has 0"),
        (["cpu", "cuda:0"], {}, r"mix CPU and CUDA ranks"),
        (["cpu", "cpu"], {"placement_strategy": "DIAGONAL"}, r"unknown placement_strategy 'DIAGONAL'"),
    ],
)
def test_bad_arguments_fail_before_any_actor_starts(devices, kwargs, message, checkpoints, ray_local):
    before_actors, before_pgs = alive_actors(ray_local), live_placement_groups(ray_local)
    with pytest.raises(ConfigError, match=message):
        load(checkpoints["llama"], devices, **kwargs)
    # Nothing of its own left; an earlier test's actor may finish exiting meanwhile (seen in CI).
    assert alive_actors(ray_local) <= before_actors
    assert live_placement_groups(ray_local) <= before_pgs


def test_one_device_runs_in_process(checkpoints):
    with load(checkpoints["llama"], ["cpu"]) as model:
        assert isinstance(model.executor, LocalExecutor)


def test_intermediate_size_that_does_not_split_is_refused():
    hf = dict(
        architectures=["LlamaForCausalLM"],
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_hidden_layers=1,
        intermediate_size=100,
        vocab_size=130,
        max_position_embeddings=64,
    )
    assert Llama3Config.from_pretrained(hf, devices=["cpu"] * 4).tp_degree == 4
    with pytest.raises(ConfigError, match="tensor-parallel degree 8 does not divide intermediate_size 100"):
        Llama3Config.from_pretrained(hf, devices=["cpu"] * 8)
