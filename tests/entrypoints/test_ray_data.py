"""Ray Data batch inference (llama3_dist.ray_data): rows through an actor pool equal LLM.generate
and LLM.chat row by row, per-row sampling params, bad rows as an error column, TP=2 inside one
actor, and an engine that dies (and may not heal) failing the dataset.

One processor run (2 actors) serves the equality, per-row, chat and bad-row tests; the TP=2 runs
start engines of their own.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from llama3_dist import LLM, SamplingParams
from llama3_dist.ray_data import OUTPUT_COLUMNS, build_processor

pytestmark = [pytest.mark.slow]

GREEDY = SamplingParams(temperature=0, max_tokens=8)
ENGINE = dict(dtype="float32", kv_cache_bytes=16 << 20)
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "small", "birds"]
PROMPTS = [" ".join(WORDS[i % 7 : i % 7 + 2 + i % 11]) + f" #{i}" for i in range(64)]
# id -> the row's sampling_params, each checked against LLM.generate with the same params
PER_ROW = {
    64: {"max_tokens": 3},
    65: {"max_tokens": 12, "ignore_eos": True},
    66: {"temperature": 0.8, "seed": 7, "max_tokens": 10},
}
CHATS = {
    70: [{"role": "user", "content": "Hello there"}],
    71: [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is Ray?"}],
}
# id -> (row fields, what its error says)
BAD = {
    80: ({"prompt": ""}, "prompt must not be empty"),
    81: ({"prompt": "fine", "sampling_params": {"temperature": -1.0}}, r"temperature must be >= 0 \(0 means greedy\)"),
    82: ({"prompt": "word " * 600}, r"the prompt has \d+ tokens; the context is 512 tokens"),
    83: ({}, r"neither 'prompt' \(text\) nor 'messages'"),
    84: ({"prompt": "fine", "sampling_params": {"top_q": 0.5}}, r"unknown field\(s\) \['top_q'\]; accepted: n, "),
}


def rows() -> list[dict]:
    items = [{"id": i, "prompt": p, "tag": f"t{i}"} for i, p in enumerate(PROMPTS)]
    items += [{"id": i, "prompt": PROMPTS[i - 64], "sampling_params": p, "tag": "per-row"} for i, p in PER_ROW.items()]
    items += [{"id": i, "messages": m, "tag": "chat"} for i, m in CHATS.items()]
    items += [{"id": i, **fields, "tag": "bad"} for i, (fields, _) in BAD.items()]
    return items


@pytest.fixture(scope="module")
def llm(tokenized_checkpoint):
    with LLM(tokenized_checkpoint, show_progress=False, **ENGINE) as llm:
        yield llm


@pytest.fixture(scope="module")
def data_rows(tokenized_checkpoint, ray_local):
    """id -> output row of one run: every row above through 2 actors of one engine each."""
    processor = build_processor(
        tokenized_checkpoint, devices="cpu", concurrency=2, batch_size=8, sampling_params=GREEDY, **ENGINE
    )
    out = processor(ray_local.data.from_items(rows())).take_all()
    by_id = {r["id"]: r for r in out}
    assert len(out) == len(by_id) == len(rows())
    return by_id


def assert_same(row: dict, expected) -> None:
    completion = expected.outputs[0]
    assert row["error"] is None, row["error"]
    assert row["generated_token_ids"] == completion.token_ids
    assert row["generated_text"] == completion.text
    assert row["num_generated_tokens"] == len(completion.token_ids)
    assert row["num_input_tokens"] == len(expected.prompt_token_ids)
    assert row["finish_reason"] == completion.finish_reason


def test_rows_through_two_actors_equal_llm_generate(data_rows, llm):
    expected = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for i, want in enumerate(expected):
        assert data_rows[i]["prompt"] == PROMPTS[i] and data_rows[i]["tag"] == f"t{i}"  # input columns kept
        assert_same(data_rows[i], want)
    assert {data_rows[i]["finish_reason"] for i in range(64)} <= {"length", "stop"}


def test_per_row_sampling_params_override_the_default(data_rows, llm):
    for i, fields in PER_ROW.items():
        params = SamplingParams(**{**GREEDY.model_dump(), **fields})
        assert_same(data_rows[i], llm.generate(PROMPTS[i - 64], params, use_tqdm=False)[0])
    assert data_rows[64]["num_generated_tokens"] == 3 and data_rows[65]["num_generated_tokens"] == 12
    # The seeded temperature row is not the greedy one (else the check above proves little).
    assert (
        data_rows[66]["generated_token_ids"] != llm.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    )


def test_chat_rows_equal_llm_chat(data_rows, llm):
    for i, messages in CHATS.items():
        assert_same(data_rows[i], llm.chat(messages, GREEDY, use_tqdm=False)[0])


def test_bad_rows_get_an_error_and_the_rest_complete(data_rows):
    for i, (_, message) in BAD.items():
        row = data_rows[i]
        assert row["error"] is not None and re.search(message, row["error"]), row["error"]
        assert row["generated_text"] == "" and row["generated_token_ids"] == [] and row["finish_reason"] is None
        assert row["num_generated_tokens"] == 0
        assert row["tag"] == "bad"
    good = [r for r in data_rows.values() if r["tag"] != "bad"]
    assert all(r["error"] is None and r["num_generated_tokens"] > 0 for r in good)
    assert all(set(OUTPUT_COLUMNS) <= set(r) for r in data_rows.values())


def test_chat_flag_renders_a_prompt_as_one_user_message(tokenized_checkpoint, ray_local, llm):
    """chat=True on the TP=2 engine: also the check that TP=2 inside one actor equals TP=1."""
    before = live_placement_groups(ray_local)
    processor = build_processor(
        tokenized_checkpoint,
        tensor_parallel_size=2,
        devices="cpu",
        batch_size=4,
        sampling_params=GREEDY,
        chat=True,
        **ENGINE,
    )
    prompts = PROMPTS[:12]
    out = processor(ray_local.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)])).take_all()
    expected = llm.chat([[{"role": "user", "content": p}] for p in prompts], GREEDY, use_tqdm=False)
    assert len(out) == len(prompts)
    for row in out:
        assert_same(row, expected[row["id"]])
    # The pool was released gracefully: the actor's __del__ closed the engine and its placement group.
    wait_for(lambda: live_placement_groups(ray_local) <= before, "the TP=2 engine's placement group to be removed")


def test_engine_that_cannot_heal_fails_the_dataset(tokenized_checkpoint, ray_local):
    """A rank of the actor's TP=2 engine (max_restarts=0: no self-healing) is killed after the
    first batch; the rows held back until then reach a dead engine, and the dataset fails naming
    it, promptly, with its group removed. (With healing, the default, the engine rebuilds the rank
    and the rows complete: tests/engine/test_self_healing.py.)"""
    ray = ray_local
    before_pgs, before_ranks = live_placement_groups(ray), rank_pids(ray)

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self):
            import asyncio

            self.opened = asyncio.Event()

        async def open(self):
            self.opened.set()

        async def wait(self):
            await self.opened.wait()

    gate = Gate.remote()

    def hold_after_first(batch):  # rows past the first four wait for the gate
        if min(batch["id"]) >= 4:
            ray.get(gate.wait.remote())
        return batch

    ds = ray.data.from_items([{"id": i, "prompt": PROMPTS[i]} for i in range(12)], override_num_blocks=3)
    ds = ds.map_batches(hold_after_first, batch_size=4)
    processor = build_processor(
        tokenized_checkpoint,
        tensor_parallel_size=2,
        devices="cpu",
        batch_size=4,
        max_concurrent_batches=1,
        sampling_params=GREEDY,
        max_restarts=0,
        **ENGINE,
    )
    # Block by block, no prefetch: a prefetching iterator waits for a second block, held at the gate.
    rows_seen = iter(processor(ds).iter_batches(batch_size=None, prefetch_batches=0, batch_format="pandas"))
    assert next(rows_seen)["error"].isna().all()  # the engine is up and has run a batch
    new_ranks = rank_pids(ray) - before_ranks
    assert len(new_ranks) == 2, new_ranks
    os.kill(max(new_ranks), signal.SIGKILL)
    ray.get(gate.open.remote())
    start = time.monotonic()
    with pytest.raises(
        Exception, match=r"the llama3-dist engine of Ray Data actor \w+ \(pid \d+ on [\d.]+\) died: "
    ) as err:
        for _ in rows_seen:
            pass
    assert time.monotonic() - start < 60
    assert "WorkerError" in str(err.value) and "rank" in str(err.value)
    wait_for(lambda: live_placement_groups(ray) <= before_pgs, "the dead engine's placement group to be removed")


def live_placement_groups(ray) -> set[str]:
    return {p for p, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"}


def rank_pids(ray) -> set[int]:
    actors = ray._private.state.actors().values()
    return {a["Pid"] for a in actors if a["ActorClassName"] == "RayWorker" and a["State"] == "ALIVE"}


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    """Polls a condition that Ray settles asynchronously (actor exit, placement group removal)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)
