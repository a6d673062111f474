"""Paged KV cache bookkeeping on the driver: which pages are free. No torch here."""
from __future__ import annotations


class KVCacheExhaustedError(RuntimeError):
    pass


class BlockPool:
    """A fixed set of KV pages handed out and returned by id."""

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
                f"KV cache exhausted: {n} more pages of {self.block_size} tokens needed, "
                f"{len(self._free)} of {self.num_blocks} free. Release finished contexts or "
                f"start the model with a larger kv_cache_pages.")
        return [self._free.pop() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(reversed(block_ids))
