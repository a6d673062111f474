"""Tensor parallelism across Ray actors (CPU, gloo, float32) against TP=1 and transformers.

Every test but the two-node one shares the session's local Ray (the ray_local fixture); the
two-node test needs a Ray cluster of its own, so it runs in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, load_reference

from llama3_dist import Llama3Model, ReturnLogits, TextContext
from llama3_dist.executor.ray_executor import DRIVER_NICE_FOR_CPU_RANKS

pytestmark = [pytest.mark.ray]

TOL = dict(atol=1e-4, rtol=1e-4)
PROMPTS = ([3, 5, 7, 9, 11, 13, 15], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [50, 60, 70])
DECODE_STEPS = 16
KV = dict(num_kv_blocks=32, block_size=8)


def run_ragged(model: Llama3Model) -> list[torch.Tensor]:
    """Prefill of a ragged batch, then DECODE_STEPS steps feeding fixed tokens; per sequence, the
    logits at every position (prompt and decoded), [len(prompt) + DECODE_STEPS, V]."""
    g = torch.Generator().manual_seed(7)
    fed = torch.randint(0, model.config.vocab_size, (DECODE_STEPS, len(PROMPTS)), generator=g)
    ctxs = [TextContext(tokens=list(p)) for p in PROMPTS]
    inputs = model.prepare_initial_token_inputs(ctxs)
    out = model.execute(inputs)
    rows = [[out.logits[out.logit_offsets[b] : out.logit_offsets[b + 1]]] for b in range(len(PROMPTS))]
    for step in range(DECODE_STEPS):
        inputs = model.prepare_next_token_inputs(fed[step], inputs)
        out = model.execute(inputs)
        for b in range(len(PROMPTS)):
            rows[b].append(out.next_token_logits[b : b + 1])
    return [torch.cat(r) for r in rows]


def expected_logits(ref, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    fed = torch.randint(0, vocab, (DECODE_STEPS, len(PROMPTS)), generator=g)
    # Decode step k feeds fed[k] at position len(prompt) + k: one causal forward over the prompt
    # and every fed token scores the same rows.
    return [ref(torch.tensor([list(p) + fed[:, b].tolist()])).logits[0] for b, p in enumerate(PROMPTS)]


def load(path, tp: int, **kwargs) -> Llama3Model:
    return Llama3Model.from_pretrained(
        path, devices=["cpu"] * tp, dtype="float32", return_logits=ReturnLogits.ALL, **KV, **kwargs
    )


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_tp2_equals_tp1_and_transformers(arch, checkpoints, references, ray_local):
    ref = references(arch)
    expected = expected_logits(ref, ref.config.vocab_size)
    with load(checkpoints[arch], 1) as tp1:
        single = run_ragged(tp1)
        full = tp1.executor.parameter_bytes()[0]
    with load(checkpoints[arch], 2) as tp2:
        assert tp2.executor.compiled_graph
        # CPU ranks on this node: the spinning driver steps aside for them.
        assert os.nice(0) >= DRIVER_NICE_FOR_CPU_RANKS
        sharded = run_ragged(tp2)
        ranks = tp2.executor.ranks
    for got, one, want in zip(sharded, single, expected):
        torch.testing.assert_close(got, one, **TOL)
        torch.testing.assert_close(got, want, **TOL)
    # Each rank holds half of every sharded tensor (vocab 130 and every split divide by 2) and
    # the whole of the replicated norms, and KV blocks for its own KV head only.
    c = tp2.config
    for r in ranks:
        assert r["parameter_bytes"]["sharded"] * 2 == full["sharded"], (r, full)
        assert r["parameter_bytes"]["replicated"] == full["replicated"]
        assert r["kv_heads"] == c.num_key_value_heads // 2
        assert (
            r["kv_cache_bytes"]
            == 2 * c.num_hidden_layers * KV["num_kv_blocks"] * KV["block_size"] * r["kv_heads"] * c.head_dim * 4
        )


@pytest.mark.slow
def test_tp4_replicates_kv_heads_beside_a_second_engine(checkpoints, references, ray_local):
    """4 query heads, 2 KV heads: each rank holds one KV head, shared by two ranks. A TP=2 engine
    runs on the same machine at the same time: each rendezvous is on its own kernel-picked port."""
    ref = references("llama")
    expected = expected_logits(ref, ref.config.vocab_size)
    with load(checkpoints["llama"], 4) as tp4, load(checkpoints["llama"], 2) as tp2:
        assert [r["kv_heads"] for r in tp4.executor.ranks] == [1, 1, 1, 1]
        assert tp4.executor.rendezvous[0] == tp2.executor.rendezvous[0] == "127.0.0.1"
        assert tp4.executor.rendezvous[1] != tp2.executor.rendezvous[1]
        got4, got2 = run_ragged(tp4), run_ragged(tp2)
    for g4, g2, want in zip(got4, got2, expected):
        torch.testing.assert_close(g4, want, **TOL)
        torch.testing.assert_close(g2, want, **TOL)


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_nodes_strict_spread(checkpoints):
    """TP=2, one rank on each of two raylets (ray.cluster_utils.Cluster), rendezvous at rank 0's
    node IP. Runs in a subprocess: it needs its own Ray, not the session's."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", "import test_tensor_parallel as t; t.two_node_main()", checkpoints["llama"]],
        env=env,
        cwd=here,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert "two-node parity ok" in proc.stdout


def two_node_main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    path = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        ref = load_reference(path)
        with load(
            path, 2, address=cluster.address, placement_strategy="STRICT_SPREAD", placement_timeout_s=60
        ) as model:
            ex = model.executor
            assert len({n["node_id"] for n in ex.nodes}) == 2, ex.nodes
            host, port = ex.rendezvous
            assert host == ex.nodes[0]["ip"] and host != "127.0.0.1", ex.rendezvous
            got = run_ragged(model)
        for g, want in zip(got, expected_logits(ref, ref.config.vocab_size)):
            torch.testing.assert_close(g, want, **TOL)
        assert not ray.is_initialized()  # the executor connected, so it disconnected at close
        print(f"two-node parity ok (compiled graph: {ex.compiled_graph}, rendezvous {host}:{port})")
    finally:
        cluster.shutdown()
