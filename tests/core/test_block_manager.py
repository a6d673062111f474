"""Block manager: ref counts, prefix caching, LRU eviction, collision safety. Pure Python."""

import pytest

from llama3_dist.core import block_manager
from llama3_dist.core.block_manager import BlockManager, BlockPool, KVCacheExhaustedError, PrefixMatch
from llama3_dist.core.text_context import TextContext

BS = 4


def ctx_of(tokens, rid=None):
    return TextContext(list(tokens), **({"request_id": rid} if rid else {}))


def run(bm, ctx, n=None):
    """Admit `ctx` with its prefix hits, compute `n` more tokens (default: all) and cache."""
    prefix = bm.match_prefix(ctx)
    n = ctx.num_tokens - prefix.num_tokens if n is None else n
    assert bm.allocate(ctx, n, prefix)
    ctx.num_computed_tokens += n
    bm.cache_full_blocks(ctx)
    return prefix


def test_block_pool_contract_kept():
    pool = BlockPool(3, 16)
    assert pool.blocks_needed(33) == 3 and pool.num_free_blocks == 3
    ids = pool.allocate(2)
    assert ids == [0, 1] and pool.num_free_blocks == 1
    with pytest.raises(KVCacheExhaustedError, match="2 more blocks"):
        pool.allocate(2)
    pool.free(ids)
    assert pool.num_free_blocks == 3


def test_prefix_reuse_shares_full_blocks_and_sets_computed_tokens():
    bm = BlockManager(16, BS)
    a = ctx_of(range(14))  # 3 full blocks + 2 tokens
    assert run(bm, a).num_tokens == 0
    assert bm.num_cached_blocks == 3
    b = ctx_of([*list(range(12)), 100, 101, 102])
    prefix = run(bm, b, n=0)
    assert prefix.num_tokens == 12 and b.num_computed_tokens == 12
    assert b.block_ids[:3] == a.block_ids[:3]
    assert [bm.ref_count(i) for i in b.block_ids[:3]] == [2, 2, 2]
    assert bm.ref_count(a.block_ids[3]) == 1
    assert bm.prefix_cache_queries == 14 + 15 and bm.prefix_cache_hits == 12
    # The new tokens get a block of their own: a shared block is never written.
    assert bm.allocate(b, 3)
    assert b.block_ids[3] not in a.block_ids and bm.ref_count(b.block_ids[3]) == 1


def test_prefix_hit_never_covers_the_whole_prompt():
    bm = BlockManager(16, BS)
    run(bm, ctx_of(range(14)))
    assert bm.match_prefix(ctx_of(range(12))).num_tokens == 8  # one token must stay to compute
    assert bm.match_prefix(ctx_of(range(13))).num_tokens == 12
    assert bm.match_prefix(ctx_of(range(4))).num_tokens == 0


def test_only_blocks_full_of_computed_tokens_are_cached():
    bm = BlockManager(16, BS)
    a = ctx_of(range(14))
    assert bm.allocate(a, 14, bm.match_prefix(a))
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 1
    assert bm.match_prefix(ctx_of(range(14))).num_tokens == 4
    a.num_computed_tokens = 13
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 3


def test_free_keeps_cached_blocks_evictable_and_ref_counts():
    bm = BlockManager(8, BS)
    a = ctx_of(range(10), "a")
    run(bm, a)
    b = ctx_of([*list(range(8)), 50, 51], "b")
    run(bm, b)
    shared = a.block_ids[:2]
    assert bm.num_used_blocks == 4 and bm.usage == 0.5
    bm.free(a)
    assert a.block_ids == [] and a.num_computed_tokens == 0
    assert [bm.ref_count(i) for i in shared] == [1, 1]
    assert bm.num_free_blocks == 5  # a's private tail block
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0
    assert bm.num_cached_blocks == 2  # still reusable
    c = ctx_of(range(10), "c")
    assert run(bm, c).num_tokens == 8 and c.block_ids[:2] == shared
    assert bm.num_free_blocks == 5  # 2 revived from the evictable pool + 1 new


def test_eviction_only_when_free_blocks_run_out_least_recently_used_first():
    bm = BlockManager(6, BS)
    a, b = ctx_of(range(9), "a"), ctx_of(range(100, 109), "b")  # 2 full blocks + 1 each
    run(bm, a)
    run(bm, b)
    bm.free(a)  # released first: evicted first
    bm.free(b)
    assert bm.num_cached_blocks == 4 and bm.num_free_blocks == 6
    c = ctx_of(range(200, 208), "c")
    assert bm.allocate(c, 8, bm.match_prefix(c))  # 2 never-cached blocks: no eviction
    assert bm.num_cached_blocks == 4
    d = ctx_of(range(300, 304), "d")
    assert bm.allocate(d, 4, bm.match_prefix(d))  # evicts a's tail block (its last block first)
    assert bm.num_cached_blocks == 3
    assert bm.match_prefix(ctx_of(range(9))).num_tokens == 4
    assert bm.match_prefix(ctx_of(range(100, 109))).num_tokens == 8
    # A hit refreshes recency: b's blocks are touched, so a's first block goes next.
    e = ctx_of(range(100, 109), "e")
    run(bm, e)
    bm.free(e)
    f = ctx_of(range(400, 404), "f")
    assert bm.allocate(f, 4, bm.match_prefix(f))
    assert bm.match_prefix(ctx_of(range(9))).num_tokens == 0
    assert bm.match_prefix(ctx_of(range(100, 109))).num_tokens == 8


def test_allocate_fails_without_side_effects():
    bm = BlockManager(4, BS)
    a = ctx_of(range(9), "a")
    run(bm, a)
    bm.free(a)  # 2 evictable cached blocks, 2 never-cached
    b = ctx_of(list(range(8)) + list(range(50, 60)), "b")  # hits 2 blocks, needs 3 more
    prefix = bm.match_prefix(b)
    assert prefix.num_tokens == 8
    assert not bm.allocate(b, 10, prefix)
    assert b.block_ids == [] and b.num_computed_tokens == 0
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    assert bm.prefix_cache_queries == 9 and bm.prefix_cache_hits == 0
    assert bm.allocate(b, 8, prefix)  # 2 revived + 2 new
    assert bm.num_free_blocks == 0
    with pytest.raises(ValueError, match="no blocks"):
        bm.allocate(b, 1, PrefixMatch())
    with pytest.raises(ValueError, match="cannot allocate"):
        bm.allocate(b, 11)


def test_same_content_computed_twice_is_cached_once():
    bm = BlockManager(16, BS)
    a, b = ctx_of(range(10), "a"), ctx_of(range(10), "b")
    for c in (a, b):  # both miss: admitted before either computed anything
        assert bm.allocate(c, 10, bm.match_prefix(c))
    for c in (a, b):
        c.num_computed_tokens = 10
        bm.cache_full_blocks(c)
    assert bm.num_cached_blocks == 2
    c = ctx_of([*list(range(8)), 7, 7, 7], "c")
    assert run(bm, c, n=0).num_tokens == 8 and c.block_ids[:2] == a.block_ids[:2]
    bm.free(b)  # b's private copies go straight back to the never-cached pool
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 16 - 3  # a holds 3, c reuses 2 of them


def test_hash_collisions_never_reuse_other_content(monkeypatch):
    monkeypatch.setattr(block_manager, "hash_block_tokens", lambda parent, toks: 7)
    bm = BlockManager(16, BS)
    run(bm, ctx_of(range(10), "a"))
    assert bm.match_prefix(ctx_of(list(range(1, 11)))).num_tokens == 0
    assert bm.match_prefix(ctx_of(range(10))).num_tokens == 4  # only one block fits the key


def test_parent_hash_collision_does_not_chain_onto_another_prefix(monkeypatch):
    # A hash that only counts depth: every block at depth d collides with every other one.
    monkeypatch.setattr(block_manager, "hash_block_tokens", lambda parent, toks: parent + 1)
    bm = BlockManager(16, BS)
    a = ctx_of([1] * 4 + [2] * 4 + [9], "a")
    run(bm, a)
    bm.free(a)
    c = ctx_of([3] * 4 + [2] * 4 + [9], "c")  # same second block after another first block
    assert run(bm, c, n=4).num_tokens == 0  # computes only its first block for now
    # c's first block took over the depth-1 key; a's second block still holds depth 2.
    d = ctx_of([3] * 4 + [2] * 4 + [9], "d")
    assert bm.match_prefix(d).num_tokens == 4  # not 8: that K/V was computed after [1]*4


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = ctx_of(range(10))
    run(bm, a)
    assert bm.num_cached_blocks == 0
    assert bm.match_prefix(ctx_of(range(10))).num_tokens == 0
    bm.free(a)
    assert bm.num_free_blocks == 8
