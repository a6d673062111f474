"""Paged KV cache bookkeeping on the driver: which blocks are free, who shares them, and which
full blocks hold a known token prefix (prefix caching). No torch here.

`BlockPool` is the plain block allocator used by the MAX-style model API. `BlockManager` adds
reference counts and prefix caching for the scheduler: every full block of computed tokens is
keyed by a hash chained over its parent's hash and its own token ids, so a new sequence that
starts with the same tokens reuses those blocks instead of recomputing them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import count

from .text_context import TextContext


class KVCacheExhaustedError(RuntimeError):
    pass


class BlockPool:
    """A fixed set of KV blocks handed out and returned by id."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise KVCacheExhaustedError(
                f"KV cache exhausted: {n} more blocks of {self.block_size} tokens needed, "
                f"{len(self._free)} of {self.num_blocks} free. Release finished contexts or "
                f"start the model with more num_kv_blocks (or kv_cache_bytes)."
            )
        return [self._free.pop() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))


# A token whose value is not known yet (the scheduler's overlapped steps); never a real id.
PLACEHOLDER = -1
_ROOT_HASH = 0x6C6C616D61  # parent hash of a sequence's first block (hash(None) is not stable)


def hash_block_tokens(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """Chained hash of one full block. Only an index: a hit is verified against the stored
    token ids and the parent's identity, so a collision costs a cache miss, never wrong K/V."""
    return hash((parent_hash, token_ids))


@dataclass(slots=True, eq=False)
class _Block:
    block_id: int
    ref_count: int = 0
    # Set while the block is registered in the prefix cache; `cache_id` is unique per
    # registration (never reused), so a child can name its exact parent even after eviction.
    hash: int | None = None
    cache_id: int | None = None
    parent_cache_id: int | None = None
    token_ids: tuple[int, ...] = ()

    def registration(self) -> tuple[int, int]:
        """(hash, cache_id) of a block registered in the prefix cache."""
        assert self.hash is not None and self.cache_id is not None, f"block {self.block_id} is not in the prefix cache"
        return self.hash, self.cache_id


@dataclass(slots=True, frozen=True)
class PrefixMatch:
    """Cached full blocks a context can reuse. Only valid until the next call that changes the
    manager: pass it straight to `BlockManager.allocate`."""

    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0


class BlockManager:
    """Reference-counted KV blocks with prefix caching, owned by the scheduler.

    Invariants: a block with ref_count > 0 belongs to the sequences that list it in their
    `block_ids`; only full blocks of computed tokens are ever shared, and new tokens are always
    written into blocks past them, so a shared block is never written. Blocks whose ref count
    drops to 0 stay registered (evictable, least recently released first) and are reclaimed only
    once the never-cached free blocks run out.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self._pool = BlockPool(num_blocks, block_size)  # free blocks holding nothing reusable
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, registered; LRU first
        self._cached: dict[int, _Block] = {}  # chained hash -> registered block
        # request_id -> (hash, cache_id) of each of its leading full blocks already registered,
        # or found registered under another block holding the same content.
        self._chains: dict[str, list[tuple[int, int]]] = {}
        self._cache_ids = count()
        self.prefix_cache_queries = 0  # tokens looked up when sequences were (re)allocated
        self.prefix_cache_hits = 0  # of those, tokens found cached

    # ---- stats ----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: never-cached ones plus evictable cached ones."""
        return self._pool.num_free_blocks + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, in use or evictable."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- the sequence lifecycle --------------------------------------------------------------

    def match_prefix(self, ctx: TextContext) -> PrefixMatch:
        """The longest chain of cached full blocks at the start of `ctx.tokens`, leaving at least
        one token to compute so the model still returns logits for the last one. Read-only."""
        if not self.enable_prefix_caching:
            return PrefixMatch()
        bs = self.block_size
        parent_hash, parent_id = _ROOT_HASH, None
        ids: list[int] = []
        for i in range((ctx.num_tokens - 1) // bs):
            toks = tuple(ctx.tokens[i * bs : (i + 1) * bs])
            h = hash_block_tokens(parent_hash, toks)
            b = self._cached.get(h)
            if b is None or b.parent_cache_id != parent_id or b.token_ids != toks:
                break
            ids.append(b.block_id)
            parent_hash, parent_id = h, b.cache_id
        return PrefixMatch(tuple(ids), len(ids) * bs)

    def allocate(self, ctx: TextContext, num_new_tokens: int, prefix: PrefixMatch | None = None) -> bool:
        """Make room for `ctx.tokens[n : n + num_new_tokens]`, n = ctx.num_computed_tokens.

        With `prefix` (only for a context holding no blocks), first take over those cached
        blocks and set `ctx.num_computed_tokens = prefix.num_tokens`. Returns False and changes
        nothing when there are not enough free blocks.
        """
        if prefix is not None and (ctx.block_ids or ctx.num_computed_tokens):
            raise ValueError(
                f"request {ctx.request_id}: a prefix can only be attached to a context "
                f"with no blocks (has {len(ctx.block_ids)}, "
                f"{ctx.num_computed_tokens} computed tokens)"
            )
        reused = [self._blocks[i] for i in prefix.block_ids] if prefix else []
        num_computed = prefix.num_tokens if prefix else ctx.num_computed_tokens
        total = num_computed + num_new_tokens
        if num_new_tokens < 0 or total > ctx.num_tokens:
            raise ValueError(
                f"request {ctx.request_id}: cannot allocate {num_new_tokens} new tokens "
                f"after {num_computed} computed, the context has {ctx.num_tokens}"
            )
        num_new_blocks = max(0, self.blocks_needed(total) - len(ctx.block_ids) - len(reused))
        num_revived = sum(1 for b in reused if b.ref_count == 0)  # leave the evictable pool
        if num_new_blocks + num_revived > self.num_free_blocks:
            return False

        if prefix is not None:
            for b in reused:
                if b.ref_count == 0:
                    del self._evictable[b.block_id]
                b.ref_count += 1
            ctx.block_ids = list(prefix.block_ids)
            ctx.num_computed_tokens = prefix.num_tokens
            self._chains[ctx.request_id] = [b.registration() for b in reused]
            self.prefix_cache_queries += ctx.num_tokens
            self.prefix_cache_hits += prefix.num_tokens
        ctx.block_ids.extend(self._take(num_new_blocks))
        return True

    def cache_full_blocks(self, ctx: TextContext) -> None:
        """Register every block of `ctx` that is now full of computed tokens. Call it after
        advancing `ctx.num_computed_tokens`."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        chain = self._chains.setdefault(ctx.request_id, [])
        for i in range(len(chain), ctx.num_computed_tokens // bs):
            parent_hash, parent_id = chain[-1] if chain else (_ROOT_HASH, None)
            toks = tuple(ctx.tokens[i * bs : (i + 1) * bs])
            if PLACEHOLDER in toks:  # a token still on its way from the device: cache it later
                break
            h = hash_block_tokens(parent_hash, toks)
            block = self._blocks[ctx.block_ids[i]]
            held = self._cached.get(h)
            if held is not None and held.parent_cache_id == parent_id and held.token_ids == toks:
                # Computed twice (both sequences missed): keep the registered copy as canonical;
                # ours stays private and is freed like any uncached block.
                chain.append(held.registration())
                continue
            if held is not None:
                if held.ref_count > 0:
                    break  # a live block with other content owns this hash: stop caching here
                self._unregister(held)
                del self._evictable[held.block_id]
                self._pool.free([held.block_id])
            block.hash, block.cache_id = h, next(self._cache_ids)
            block.parent_cache_id, block.token_ids = parent_id, toks
            self._cached[h] = block
            chain.append((h, block.cache_id))

    def free(self, ctx: TextContext) -> None:
        """Release the context's blocks (finish, abort or preemption): it then holds no K/V."""
        # Tail first, so that a sequence's later blocks are evicted before its earlier ones.
        for block_id in reversed(ctx.block_ids):
            b = self._blocks[block_id]
            b.ref_count -= 1
            if b.ref_count == 0:
                if b.cache_id is not None:
                    self._evictable[block_id] = None
                else:
                    self._pool.free([block_id])
        ctx.block_ids = []
        ctx.num_computed_tokens = 0
        self._chains.pop(ctx.request_id, None)

    # ---- internals -------------------------------------------------------------------------

    def _take(self, n: int) -> list[int]:
        ids = self._pool.allocate(min(n, self._pool.num_free_blocks))
        while len(ids) < n:
            block_id, _ = self._evictable.popitem(last=False)
            self._unregister(self._blocks[block_id])
            ids.append(block_id)
        for i in ids:
            self._blocks[i].ref_count = 1
        return ids

    def _unregister(self, b: _Block) -> None:
        if b.hash is not None and self._cached.get(b.hash) is b:
            del self._cached[b.hash]
        b.hash = b.cache_id = b.parent_cache_id = None
        b.token_ids = ()
