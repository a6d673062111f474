"""Continuous batching: budgets, chunked prefill, preemption, and a simulated engine loop whose
outputs must not depend on cache size, budget or prefix caching. Pure Python."""

import pytest

from llama3_dist.core import block_manager
from llama3_dist.core.scheduler import RequestStatus, Scheduler
from llama3_dist.core.text_context import TextContext

BS = 4


def ctx_of(tokens, rid):
    return TextContext(list(tokens), request_id=rid)


def step(sched, token=0):
    """One step with a model that samples `token` for every sampling entry."""
    out = sched.schedule()
    got = sched.update(out, {e.request_id: token for e in out.scheduled if e.samples})
    return out, got


def plan(out):
    return [(e.request_id, e.start, e.num_new_tokens, e.samples) for e in out.scheduled]


def test_token_budget_and_max_num_seqs():
    sched = Scheduler(num_blocks=64, block_size=BS, max_num_batched_tokens=10, max_num_seqs=3)
    for i in range(5):
        sched.add_request(ctx_of(range(i * 10, i * 10 + 4), f"r{i}"))
    out, _ = step(sched)
    assert plan(out) == [("r0", 0, 4, True), ("r1", 0, 4, True), ("r2", 0, 2, False)]
    assert out.num_batched_tokens == 10
    out, _ = step(sched)  # decodes first, then r2's last chunk; r3 waits for a seat
    assert plan(out) == [("r0", 4, 1, True), ("r1", 4, 1, True), ("r2", 2, 2, True)]
    assert sched.stats().num_running == 3 and sched.stats().num_waiting == 2
    sched.finish("r1")
    out, _ = step(sched)
    assert plan(out) == [("r0", 5, 1, True), ("r2", 4, 1, True), ("r3", 0, 4, True)]


def test_chunked_prefill_samples_only_at_the_end_of_the_prompt():
    sched = Scheduler(num_blocks=64, block_size=BS, max_num_batched_tokens=4)
    ctx = ctx_of(range(10), "a")
    sched.add_request(ctx)
    chunks = []
    for _ in range(3):
        out, got = step(sched, token=77)
        chunks += plan(out)
        assert got == ([] if len(chunks) < 3 else [sched.requests["a"]])
    assert chunks == [("a", 0, 4, False), ("a", 4, 4, False), ("a", 8, 2, True)]
    assert ctx.tokens == [*list(range(10)), 77] and ctx.num_computed_tokens == 10
    assert len(ctx.block_ids) == 3


def test_decodes_are_scheduled_before_new_prompts():
    sched = Scheduler(num_blocks=64, block_size=BS, max_num_batched_tokens=8)
    sched.add_request(ctx_of(range(3), "a"))
    step(sched)
    sched.add_request(ctx_of(range(100, 120), "b"))
    out, _ = step(sched)
    assert plan(out) == [("a", 3, 1, True), ("b", 0, 7, False)]


def test_prefix_hit_skips_cached_tokens_in_the_schedule():
    sched = Scheduler(num_blocks=64, block_size=BS, max_num_batched_tokens=64)
    sched.add_request(ctx_of(range(10), "a"))
    step(sched)
    sched.add_request(ctx_of([*list(range(8)), 42, 43], "b"))
    out, _ = step(sched)
    assert plan(out) == [("a", 10, 1, True), ("b", 8, 2, True)]
    st = sched.stats()
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (20, 8)
    assert st.prefix_cache_hit_rate == pytest.approx(0.4)


def test_newest_request_is_preempted_and_resumes_with_its_tokens():
    # 4 blocks of 4: a and b (6-token prompts) hold 2 blocks each, then b needs a third.
    sched = Scheduler(num_blocks=4, block_size=BS, max_num_batched_tokens=64, enable_prefix_caching=False)
    a, b = ctx_of(range(6), "a"), ctx_of(range(10, 16), "b")
    sched.add_request(a)
    sched.add_request(b)
    for t in (1, 2, 3):  # computes up to position 8: both fill their 2 blocks
        step(sched, token=t)
    assert b.tokens == [*list(range(10, 16)), 1, 2, 3] and b.num_computed_tokens == 8
    out, _ = step(sched, token=4)  # a takes the last free block; b (newest) must go
    assert plan(out) == [("a", 8, 1, True)]
    assert out.preempted == [sched.requests["b"]]
    rb = sched.requests["b"]
    assert rb.status is RequestStatus.PREEMPTED and rb.num_preemptions == 1
    assert b.block_ids == [] and b.num_computed_tokens == 0
    assert b.tokens == [*range(10, 16), 1, 2, 3]  # nothing lost
    assert list(sched.waiting) == [rb] and sched.stats().num_preemptions == 1
    sched.finish("a")
    out, _ = step(sched, token=5)  # b recomputes everything it had, then samples on
    assert plan(out) == [("b", 0, 9, True)]
    assert b.tokens == [*list(range(10, 16)), 1, 2, 3, 5] and rb.status is RequestStatus.RUNNING


def test_preemption_puts_requests_back_in_arrival_order():
    sched = Scheduler(num_blocks=3, block_size=BS, max_num_batched_tokens=64, enable_prefix_caching=False)
    for i in range(3):
        sched.add_request(ctx_of(range(i * 10, i * 10 + 4), f"r{i}"))
    step(sched)  # three full blocks
    out, _ = step(sched)  # r0 needs a block: r2 goes, then r1 goes
    assert plan(out) == [("r0", 4, 1, True)]
    assert [r.request_id for r in out.preempted] == ["r2", "r1"]
    assert [r.request_id for r in sched.waiting] == ["r1", "r2"]


def test_a_prompt_that_can_never_fit_is_rejected():
    sched = Scheduler(num_blocks=2, block_size=BS)
    with pytest.raises(ValueError, match="prompt of 9 tokens can never fit"):
        sched.add_request(ctx_of(range(9), "big"))
    sched.add_request(ctx_of(range(8), "ok"))
    with pytest.raises(ValueError, match="already in the scheduler"):
        sched.add_request(ctx_of(range(3), "ok"))


def test_a_sequence_outgrowing_the_whole_cache_is_capped_not_hung():
    sched = Scheduler(num_blocks=2, block_size=BS)
    ctx = ctx_of(range(7), "a")
    sched.add_request(ctx)
    step(sched)  # 8 tokens: the cache is full
    step(sched)  # computes position 7, samples a 9th token
    out = sched.schedule()
    assert [r.request_id for r in out.capped] == ["a"] and not out.scheduled
    assert not sched.has_unfinished_requests() and sched.block_manager.num_used_blocks == 0


def test_abort_frees_blocks_wherever_the_request_is():
    sched = Scheduler(num_blocks=8, block_size=BS, max_num_seqs=1)
    sched.add_request(ctx_of(range(9), "run"))
    sched.add_request(ctx_of(range(20, 29), "wait"))
    out = sched.schedule()
    assert sched.block_manager.num_used_blocks == 3
    assert sched.abort("run").status is RequestStatus.FINISHED  # mid-step: update skips it
    assert sched.update(out, {"run": 1}) == []
    assert sched.block_manager.num_used_blocks == 0
    assert sched.abort("wait") is not None and sched.abort("wait") is None
    assert not sched.has_unfinished_requests() and len(sched.schedule()) == 0
    with pytest.raises(KeyError):
        sched.finish("run")


def test_schedule_and_update_must_alternate():
    sched = Scheduler(num_blocks=8, block_size=BS)
    sched.add_request(ctx_of(range(3), "a"))
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="twice"):
        sched.schedule()
    with pytest.raises(KeyError, match="no sampled token"):
        sched.update(out, {})


# ---- a simulated engine -----------------------------------------------------------------------


def next_token(prefix):
    return hash(tuple(prefix)) % 997


def expected_outputs(prompt, max_tokens):
    toks = list(prompt)
    for _ in range(max_tokens):
        toks.append(next_token(toks))
    return toks[len(prompt) :]


def simulate(requests, num_blocks, budget, max_num_seqs=8, prefix_caching=True):
    """Run a fake model over a fake paged cache. Each slot remembers (position, token) written
    there; sampling reads the whole prefix back through the block table, so any wrong sharing,
    stale block or lost token changes the output."""
    sched = Scheduler(
        num_blocks, BS, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, enable_prefix_caching=prefix_caching
    )
    bm = sched.block_manager
    slots = [None] * (num_blocks * BS)
    arrivals = sorted(requests, key=lambda r: r[0])
    max_tokens, outputs, steps = {}, {}, 0
    while arrivals or sched.has_unfinished_requests():
        while arrivals and arrivals[0][0] <= steps:
            _, rid, prompt, n = arrivals.pop(0)
            sched.add_request(ctx_of(prompt, rid))
            max_tokens[rid] = n
        out = sched.schedule()
        assert not out.capped
        assert out.num_batched_tokens == sum(e.num_new_tokens for e in out.scheduled) <= budget
        assert len(sched.running) <= max_num_seqs
        sampled = {}
        for e in out.scheduled:
            ctx, bt = e.context, e.context.block_ids
            assert e.start == ctx.num_computed_tokens and e.num_new_tokens >= 1
            for pos in range(e.start, e.start + e.num_new_tokens):
                block = bt[pos // BS]
                assert bm.ref_count(block) == 1 and bm._blocks[block].cache_id is None, (
                    "wrote into a shared or cached block"
                )
                slots[block * BS + pos % BS] = (pos, ctx.tokens[pos])
            if e.samples:
                end = e.start + e.num_new_tokens
                seen = [slots[bt[p // BS] * BS + p % BS] for p in range(end)]
                assert seen == list(enumerate(ctx.tokens[:end]))
                sampled[e.request_id] = next_token([t for _, t in seen])
        for req in sched.update(out, sampled):
            if req.num_output_tokens == max_tokens[req.request_id]:
                outputs[req.request_id] = req.output_token_ids
                sched.finish(req.request_id)
        steps += 1
        assert steps < 2000, "the scheduler stopped making progress"
    assert bm.num_used_blocks == 0
    return outputs, sched.stats()


def workload():
    shared = list(range(500, 514))  # 3 full blocks + 2 tokens of common system prompt
    reqs = []
    for i in range(8):
        prompt = shared + [i] * (i % 3 + 1) if i % 2 == 0 else list(range(i * 40, i * 40 + 5 + i))
        reqs.append((i // 3, f"r{i}", prompt, 6 + i % 4))
    # The same block-aligned prompt twice: the second must still compute its last token.
    reqs += [(0, "dup0", list(range(700, 708)), 5), (2, "dup1", list(range(700, 708)), 5)]
    return reqs


@pytest.mark.parametrize(
    "num_blocks,budget,prefix_caching,colliding_hash",
    [
        (1000, 512, True, False),  # everything fits: no preemption
        (1000, 5, True, False),  # tiny budget: chunked prefills everywhere
        (9, 16, True, False),  # tiny cache: preemption and recomputation
        (9, 16, False, False),
        (7, 3, True, False),  # both at once
        (1000, 512, True, True),  # a hash that collides all the time must cost hits only
        (7, 3, True, True),
    ],
)
def test_outputs_do_not_depend_on_cache_size_budget_or_prefix_caching(
    monkeypatch, num_blocks, budget, prefix_caching, colliding_hash
):
    if colliding_hash:
        monkeypatch.setattr(block_manager, "hash_block_tokens", lambda parent, toks: (parent + 1) % 3)
    reqs = workload()
    outputs, stats = simulate(reqs, num_blocks, budget, prefix_caching=prefix_caching)
    assert outputs == {rid: expected_outputs(p, n) for _, rid, p, n in reqs}
    if num_blocks < 10:
        assert stats.num_preemptions > 0
    else:
        assert stats.num_preemptions == 0
    if prefix_caching and num_blocks > 10:
        assert stats.prefix_cache_hits > 0
