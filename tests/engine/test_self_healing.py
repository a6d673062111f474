"""Self-healing (issue 14): a rank that fails is replaced and every unfinished request completes
exactly as it would have without the fault; the budget bounds it; an idle engine finds a dead rank
by its health ping.

TP=2 on the session's Ray (gloo): ranks are killed with SIGKILL between steps, so the next step
meets a dead actor; greedy and seeded outputs are compared with a fault-free TP=1 run (TP=2
equals TP=1: tests/engine/test_serving.py). The local executor's case injects an exception into
the worker's step.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest
import torch

from llama3_dist import LLMEngine, SamplingParams
from llama3_dist.async_engine import AsyncLLMEngine, EngineDeadError
from llama3_dist.engine import EngineFailedError
from llama3_dist.executor.worker import Worker

pytestmark = [pytest.mark.slow]

ENGINE = dict(dtype="float32", kv_cache_bytes=8 << 20, max_num_seqs=16, show_progress=False)
GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
# Rebuilds on the engine thread use plain actor calls: Ray 2.60 can abort the whole driver process
# when a compiled graph registers its channels on a thread while a rank of the previous group is
# being torn down ("Check failed ... Experimental mutable object must be in the local object
# store", experimental_mutable_object_provider.cc) - seen 3 times in about 10 full runs. The
# main-thread tests below keep the compiled graph.
THREAD_SAFE_RAY = dict(compiled_graph=False)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True)


def requests() -> dict[str, tuple[list[int], SamplingParams]]:
    """16 concurrent requests of mixed lengths: 14 greedy, 2 seeded."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(4, 60, (16,), generator=g).tolist()
    prompts = [torch.randint(0, 130, (n,), generator=g).tolist() for n in lengths]
    return {f"r{i}": (p, SEEDED if i % 8 == 7 else GREEDY) for i, p in enumerate(prompts)}


def run(engine: LLMEngine, faults: dict[int, callable] | None = None) -> dict[str, list[int]]:
    """Every request to the end; faults[k]() runs before step k."""
    for request_id, (prompt, params) in requests().items():
        engine.add_request(request_id, prompt_token_ids=prompt, params=params)
    done, step = {}, 0
    while engine.has_unfinished_requests():
        if faults and step in faults:
            faults[step]()
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    return done


@pytest.fixture(scope="module")
def reference(checkpoints):
    engine = LLMEngine(checkpoints["llama"], **ENGINE)
    try:
        return run(engine)
    finally:
        engine.shutdown()


def kill_rank(engine: LLMEngine, rank: int) -> int:
    pid = engine.executor.nodes[rank]["pid"]
    os.kill(pid, signal.SIGKILL)
    psutil.Process(pid).wait(10)  # dead before the next step starts
    return pid


def test_killed_ranks_are_replaced_and_every_request_completes_identically(checkpoints, reference, ray_local):
    engine = LLMEngine(checkpoints["llama"], devices=["cpu", "cpu"], **ENGINE)
    try:
        first_ranks = [n["pid"] for n in engine.executor.nodes]
        killed: list[int] = []
        # rank 1 mid-generation, then rank 0 once the rebuilt group has run a few steps
        faults = {4: lambda: killed.append(kill_rank(engine, 1)), 12: lambda: killed.append(kill_rank(engine, 0))}
        out = run(engine, faults)
        assert out == reference, {r: (out.get(r), reference[r]) for r in reference if out.get(r) != reference[r]}
        stats = engine.stats()
        assert stats.num_restarts == 2 and stats.num_requests_retried == 32, stats
        assert stats.last_recovery_ms > 0 and stats.kv_blocks_used == 0
        assert len(killed) == 2 and killed[0] == first_ranks[1] and killed[1] not in first_ranks
        new_ranks = [n["pid"] for n in engine.executor.nodes]
        assert not set(new_ranks) & set(first_ranks) and not set(new_ranks) & set(killed)
        assert engine.recovering is None
        # and it keeps serving
        engine.add_request("after", prompt_token_ids=requests()["r0"][0], params=GREEDY)
        while engine.has_unfinished_requests():
            last = engine.step()
        assert list(last[0].outputs[0].token_ids) == reference["r0"]
    finally:
        engine.shutdown()


def test_restart_budget_spent_is_a_clear_error(checkpoints, ray_local):
    engine = LLMEngine(checkpoints["llama"], devices=["cpu", "cpu"], max_restarts=1, **ENGINE)
    try:
        # the fault as it is seen first: the rank's death or its compiled-graph channel closing (Ray),
        # or the surviving rank's all-reduce losing its peer (gloo)
        budget = (
            r"WorkerError: .*(died|[Cc]hannel closed|Connection closed by peer).*"
            r"rebuilt 1 times in the last 600 s; max_restarts=1"
        )
        with pytest.raises(EngineFailedError, match=budget):
            run(engine, {2: lambda: kill_rank(engine, 1), 6: lambda: kill_rank(engine, 1)})
        assert engine.stats().num_restarts == 1
    finally:
        engine.shutdown()


def test_idle_engine_finds_a_dead_rank_by_its_ping_and_heals(checkpoints, reference, ray_local):
    """/health answers 503 "recovering" with the fault while the ranks are rebuilt, then 200."""
    import httpx

    from llama3_dist.entrypoints.openai_server import ServerThread

    llm_engine = LLMEngine(checkpoints["llama"], devices=["cpu", "cpu"], **THREAD_SAFE_RAY, **ENGINE)
    engine = AsyncLLMEngine(llm_engine, health_check_interval_s=0.5)
    with ServerThread(engine) as server:
        assert httpx.get(server.url + "/health").status_code == 200
        kill_rank(engine.engine, 1)
        killed_at, seen = time.monotonic(), []
        while engine.stats().num_restarts == 0:  # the ping finds it and the engine rebuilds
            assert time.monotonic() - killed_at < 60, "the dead rank was not found by the idle ping"
            assert engine.is_alive, engine.error
            health = httpx.get(server.url + "/health")
            if health.status_code == 503:
                seen.append(health.json())
            time.sleep(0.05)
        assert seen and seen[0]["status"] == "recovering" and "rank 1" in seen[0]["error"], seen
        assert httpx.get(server.url + "/health").json() == {"status": "ok"}

        async def after_heal():
            prompt, params = requests()["r3"]
            return [o async for o in engine.generate("after-heal", None, params, prompt)]

        outs = asyncio.run(after_heal())
        assert list(outs[-1].outputs[0].token_ids) == reference["r3"]
    engine.shutdown()


def test_local_worker_exception_is_retried_once_on_a_rebuilt_worker(checkpoints, reference, monkeypatch):
    launch = Worker.launch
    calls = {"n": 0, "fail_at": {5}}

    def flaky(self, step):
        calls["n"] += 1
        if calls["n"] in calls["fail_at"]:
            raise RuntimeError("injected fault in the worker's step")
        return launch(self, step)

    monkeypatch.setattr(Worker, "launch", flaky)
    engine = LLMEngine(checkpoints["llama"], **ENGINE)
    try:
        assert run(engine) == reference
        assert engine.stats().num_restarts == 1
        # a fault that follows the work (every try of the step fails) ends the engine, clearly
        calls["n"], calls["fail_at"] = 0, set(range(3, 10_000))
        again = r"injected fault.*again, before the rebuilt ranks completed a step"
        with pytest.raises(EngineFailedError, match=again):
            run(engine)
    finally:
        engine.shutdown()


def test_async_engine_that_cannot_heal_fails_its_requests_and_health(checkpoints, monkeypatch):
    from llama3_dist.entrypoints.openai_server import ServerThread

    launch = Worker.launch
    monkeypatch.setattr(Worker, "launch", lambda self, step: (_ for _ in ()).throw(RuntimeError("always broken")))
    engine = AsyncLLMEngine(LLMEngine(checkpoints["llama"], max_restarts=0, **ENGINE))
    with ServerThread(engine) as server:
        import httpx

        async def one():
            prompt, params = requests()["r0"]
            with pytest.raises(EngineDeadError, match="always broken"):
                async for _ in engine.generate("doomed", None, params, prompt):
                    pass

        asyncio.run(one())
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 503 and "always broken" in health.json()["error"]
    monkeypatch.setattr(Worker, "launch", launch)


def test_streams_through_the_server_resume_where_they_stopped(tokenized_checkpoint, ray_local):
    """16 streaming chat clients at TP=2; rank 1 is killed once every stream has text: each stream's
    text is the fault-free text, no piece missing or repeated, and /metrics counts one restart."""
    import re
    import threading

    import httpx
    import openai

    from llama3_dist import LLM
    from llama3_dist.entrypoints.openai_server import ServerThread

    params = dict(max_tokens=120, temperature=0.0)
    questions = [f"Question {i}: tell me about the number {i * 7}." for i in range(16)]
    with LLM(tokenized_checkpoint, **ENGINE) as llm:
        expected = [
            o.outputs[0].text
            for o in llm.chat(
                [[{"role": "user", "content": q}] for q in questions],
                SamplingParams(**params, ignore_eos=True),
                use_tqdm=False,
            )
        ]
    engine = AsyncLLMEngine(LLMEngine(tokenized_checkpoint, devices=["cpu", "cpu"], **THREAD_SAFE_RAY, **ENGINE))
    texts = [""] * len(questions)
    chunks = [0] * len(questions)
    errors: list[BaseException] = []
    with ServerThread(engine, served_model_name="tiny") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)

        def stream(i: int) -> None:
            try:
                for chunk in client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": questions[i]}],
                    stream=True,
                    extra_body={"ignore_eos": True},
                    **params,
                ):
                    if chunk.choices and chunk.choices[0].delta.content:
                        texts[i] += chunk.choices[0].delta.content
                        chunks[i] += 1
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while min(chunks) < 2:  # every stream is under way
            assert time.monotonic() < deadline and not errors, (chunks, errors)
            time.sleep(0.01)
        kill_rank(engine.engine, 1)
        assert max(chunks) < params["max_tokens"], "the streams ended before the kill: make them longer"
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert texts == expected, [i for i, (a, b) in enumerate(zip(texts, expected)) if a != b]
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
        assert re.search(r"^llama3_dist_engine_restarts_total\{[^}]*\} 1(\.0)?$", metrics, re.M), metrics
        assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    engine.shutdown()
