"""Overlapped scheduling (async_scheduling): each step is scheduled and launched before the
previous one's tokens are back on the host; those tokens reach the next step's inputs on the
device. On a CPU a launched step has already run, so this checks the bookkeeping, not the
speed: outputs identical to the synchronous engine for greedy and seeded sampling, with stop
strings and token ids, max_tokens, aborts and preemption, and no token past a limit computed."""

from __future__ import annotations

import collections

import pytest
from test_serving import mixed_prompts

from llama3_dist import LLM, LLMEngine, SamplingParams


def params_mix(n: int) -> list[SamplingParams]:
    """Greedy and seeded sampling (top-k / top-p / min-p), varied lengths, stop token ids."""
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.9, seed=3, top_p=0.8),
        dict(temperature=1.1, seed=5, top_k=7),
        dict(temperature=0.7, seed=9, min_p=0.1, stop_token_ids=[17, 23]),
        dict(temperature=0.0, stop_token_ids=[2, 40]),
    ]
    return [SamplingParams(max_tokens=3 + 5 * (i % 6), **kinds[i % len(kinds)]) for i in range(n)]


def run(path, prompts, params, async_scheduling, **kwargs):
    with LLM(path, dtype="float32", show_progress=False, async_scheduling=async_scheduling, **kwargs) as llm:
        assert llm.engine.async_scheduling is async_scheduling
        launched = []
        real_launch = llm.engine.executor.launch
        llm.engine.executor.launch = lambda step: launched.append(step.previous_rows) or real_launch(step)
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        stats = llm.engine.stats()
        assert stats.kv_blocks_used == 0 and not llm.engine.has_unfinished_requests()
        return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs], launched, stats


@pytest.mark.parametrize("num_kv_blocks", [None, 12])  # 12 blocks of 16: preemption
def test_same_outputs_as_the_synchronous_engine(checkpoints, num_kv_blocks):
    prompts = mixed_prompts(14, seed=21)
    params = params_mix(14)
    expected, sync_launched, _ = run(checkpoints["llama"], prompts, params, False, num_kv_blocks=num_kv_blocks)
    got, launched, stats = run(checkpoints["llama"], prompts, params, True, num_kv_blocks=num_kv_blocks)
    assert got == expected
    assert all(rows is None for rows in sync_launched)
    assert sum(rows is not None for rows in launched) > len(launched) // 2  # most steps ran ahead
    assert {reason for _, reason in got} == {"length", "stop"}
    if num_kv_blocks is not None:
        assert stats.num_preemptions > 0


def test_no_token_past_a_limit_is_computed(checkpoints):
    """A sequence whose last token (max_tokens) is in flight is not scheduled again: each request
    runs in exactly prompt-chunks + max_tokens - 1 steps, and no extra token is counted."""
    prompts = mixed_prompts(6, seed=4)
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(6)]
    with LLM(checkpoints["llama"], dtype="float32", show_progress=False, async_scheduling=True) as llm:
        engine = llm.engine
        scheduled = collections.Counter()
        real_schedule = engine.scheduler.schedule

        def schedule():
            out = real_schedule()
            scheduled.update(e.request_id for e in out.scheduled)
            return out

        engine.scheduler.schedule = schedule
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
        assert engine.num_generated_tokens == sum(p.max_tokens for p in params)
        # one prefill (short prompts, one chunk each), then a decode step per further token
        assert sorted(scheduled.values()) == sorted(p.max_tokens for p in params)


@pytest.mark.slow
def test_stop_strings_and_abort(tokenized_checkpoint):
    """Text stops (found a step late) end the output where the synchronous engine ends it; a
    request aborted while its step is in flight reports nothing more and frees its blocks."""
    prompts = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
    params = [SamplingParams(max_tokens=40, temperature=0.8, seed=i, stop=[" the", "e"]) for i in range(3)]
    results = {}
    for async_scheduling in (False, True):
        with LLM(tokenized_checkpoint, dtype="float32", show_progress=False, async_scheduling=async_scheduling) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            results[async_scheduling] = [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]
    assert results[True] == results[False]

    engine = LLMEngine(tokenized_checkpoint, dtype="float32", show_progress=False, async_scheduling=True)
    try:
        engine.add_request("a", [5, 6, 7] * 20, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
        engine.add_request("b", [8, 9], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        for _ in range(3):
            engine.step()
        assert engine._in_flight is not None and "a" in engine._in_flight.rows  # "a" has a token under way
        engine.abort_request("a")
        seen = []
        while engine.has_unfinished_requests():
            seen += engine.step()
        assert "a" not in {o.request_id for o in seen}  # its token in flight is dropped
        finished = [o for o in seen if o.finished]
        assert [o.request_id for o in finished] == ["b"] and len(finished[0].outputs[0].token_ids) == 6
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.shutdown()
