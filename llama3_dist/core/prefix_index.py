"""PrefixIndex: which replica was recently sent which prompt prefixes, for prefix-aware routing.

Each engine replica keeps a prefix cache of full KV blocks keyed by a hash chained over the
block's tokens and its parent's hash (block_manager.hash_block_tokens). The router keeps the same
keys for the prompts it has sent to each replica, so it can send a new request to the replica
whose cache most likely holds its longest prefix. The index is the router's memory of what it
sent, not the replicas' caches themselves: a replica may have evicted a block since, and a block
another router sent is unknown here. Both only cost hits, never correctness.

rank_replicas() is the policy: among replicas whose load is within `imbalance_threshold` of the
least loaded one, the longest match wins; without a match, the request's first block picks one by
rendezvous hashing, so every router (one per ingress replica) sends a new prefix to the same
replica; the others follow, least loaded first.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Sequence

from .block_manager import _ROOT_HASH, hash_block_tokens


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of the prompt's full blocks, as the engine's prefix cache keys them."""
    hashes, parent = [], _ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, tuple(token_ids[start : start + block_size]))
        hashes.append(parent)
    return hashes


class PrefixIndex:
    """Per replica, the block hashes most recently sent to it (least recently used dropped first)."""

    def __init__(self, max_blocks_per_replica: int = 1 << 16):
        if max_blocks_per_replica < 1:
            raise ValueError(f"max_blocks_per_replica must be >= 1, got {max_blocks_per_replica}")
        self.max_blocks_per_replica = max_blocks_per_replica
        self._blocks: dict[str, OrderedDict[int, None]] = {}

    def insert(self, replica: str, hashes: Sequence[int]) -> None:
        blocks = self._blocks.setdefault(replica, OrderedDict())
        for h in hashes:
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.max_blocks_per_replica:
            blocks.popitem(last=False)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per known replica, how many leading blocks of the request it was sent (chained hashes:
        block k present means the whole prefix up to k was)."""
        result = {}
        for replica, blocks in self._blocks.items():
            n = 0
            while n < len(hashes) and hashes[n] in blocks:
                n += 1
            result[replica] = n
        return result

    def remove(self, replica: str) -> None:
        self._blocks.pop(replica, None)

    def keep_only(self, replicas: set[str]) -> None:
        for replica in list(self._blocks):
            if replica not in replicas:
                del self._blocks[replica]

    def __len__(self) -> int:
        return len(self._blocks)


def rendezvous_score(key: int, replica: str) -> int:
    """Highest-random-weight hashing: stable across processes (str hashes are salted per process)."""
    return zlib.crc32(f"{key}:{replica}".encode())


def rank_replicas(
    candidates: Sequence[str],
    loads: dict[str, int],
    matches: dict[str, int],
    first_block: int | None,
    imbalance_threshold: int,
) -> list[list[str]]:
    """Replica ids in preference tiers: the router takes the least loaded of the first tier that
    has room, else tries the next tier. Loads are the requests each replica is running or queueing."""
    if not candidates:
        return []
    least = min(loads.get(c, 0) for c in candidates)
    balanced = [c for c in candidates if loads.get(c, 0) <= least + imbalance_threshold]
    best = max(matches.get(c, 0) for c in balanced)
    if best > 0:
        first = [c for c in balanced if matches.get(c, 0) == best]
    elif first_block is not None:
        first = [max(balanced, key=lambda c: rendezvous_score(first_block, c))]
    else:  # shorter than a block: nothing to share, balance the load
        first = balanced
    rest = sorted((c for c in candidates if c not in first), key=lambda c: loads.get(c, 0))
    return [tier for tier in (first, rest) if tier]
