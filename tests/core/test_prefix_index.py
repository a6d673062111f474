"""The prefix-aware routing policy (core/prefix_index.py), without Ray: the router's block keys are
the engine's prefix-cache keys, the index remembers leading blocks per replica, and the ranking
prefers the longest match within the load bound and spreads new prefixes by rendezvous hashing."""

from __future__ import annotations

import random

import pytest

from llama3_dist.core.block_manager import BlockManager
from llama3_dist.core.prefix_index import PrefixIndex, block_hashes, rank_replicas, rendezvous_score
from llama3_dist.core.text_context import TextContext

BLOCK = 16


def test_block_hashes_are_the_engine_prefix_cache_keys():
    """A prompt the engine cached is found again under the router's keys: the keys are chained,
    so prompts that share 40 tokens share exactly their first two full blocks."""
    tokens = list(range(1000, 1050))
    other = tokens[:40] + list(range(5000, 5010))
    a, b = block_hashes(tokens, BLOCK), block_hashes(other, BLOCK)
    assert len(a) == len(b) == 3  # 50 tokens: 3 full blocks, the tail is never cached
    assert a[:2] == b[:2] and a[2] != b[2]
    assert block_hashes(tokens[:15], BLOCK) == []

    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    ctx = TextContext(tokens=list(tokens), request_id="r")
    assert manager.allocate(ctx, len(tokens))
    ctx.num_computed_tokens = len(tokens)
    manager.cache_full_blocks(ctx)
    assert set(manager._cached) == set(a), "the router's keys differ from the engine's prefix-cache keys"


def test_index_matches_leading_blocks_and_forgets_least_recent():
    index = PrefixIndex(max_blocks_per_replica=4)
    index.insert("a", [1, 2, 3])
    index.insert("b", [1, 9])
    assert index.match([1, 2, 3, 4]) == {"a": 3, "b": 1}
    assert index.match([5, 2, 3]) == {"a": 0, "b": 0}  # the count stops at the first block not sent
    index.insert("a", [7, 8])  # 5 blocks > 4: block 1, the least recently sent, goes
    assert index.match([1, 2]) == {"a": 0, "b": 1}
    index.keep_only({"b"})
    assert len(index) == 1 and index.match([1]) == {"b": 1}
    index.remove("b")
    assert len(index) == 0
    with pytest.raises(ValueError, match="max_blocks_per_replica must be >= 1, got 0"):
        PrefixIndex(0)


def test_longest_match_wins_within_the_load_bound():
    loads = {"a": 3, "b": 0, "c": 1}
    tiers = rank_replicas(["a", "b", "c"], loads, {"a": 5, "b": 2}, first_block=11, imbalance_threshold=8)
    assert tiers == [["a"], ["b", "c"]]
    # a is more than the threshold busier than the least loaded: the prefix spreads to the best
    # match among the others, and a is only the fallback
    tiers = rank_replicas(["a", "b", "c"], {**loads, "a": 9}, {"a": 5, "b": 2}, first_block=11, imbalance_threshold=8)
    assert tiers == [["b"], ["c", "a"]]


def test_new_prefixes_spread_by_rendezvous_and_agree_across_routers():
    replicas = ["r1", "r2", "r3"]
    chosen = []
    for first_block in random.Random(0).sample(range(1 << 30), 300):
        (first,) = rank_replicas(replicas, {}, {}, first_block, imbalance_threshold=8)[0]
        # another router (another order of candidates) picks the same replica
        assert rank_replicas(replicas[::-1], {}, {}, first_block, 8)[0] == [first]
        assert first == max(replicas, key=lambda r: rendezvous_score(first_block, r))
        chosen.append(first)
    counts = [chosen.count(r) for r in replicas]
    assert min(counts) > 60, counts  # about 100 each


def test_prompt_shorter_than_a_block_goes_by_load():
    tiers = rank_replicas(["a", "b", "c"], {"a": 2, "b": 0, "c": 30}, {}, first_block=None, imbalance_threshold=8)
    assert tiers == [["a", "b"], ["c"]]
    assert rank_replicas([], {}, {}, None, 8) == []
