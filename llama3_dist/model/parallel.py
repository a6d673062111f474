"""The tensor-parallel group a rank belongs to: its rank, the world size, and the collectives.

At one device every collective is a no-op, so the same layers run in-process and sharded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1

    def shard(self, size: int) -> tuple[int, int]:
        """This rank's [start, stop) of a dimension split evenly across ranks."""
        per = size // self.world_size
        return self.rank * per, (self.rank + 1) * per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenates every rank's x along the last dim on rank 0; other ranks get None."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        if self.rank != 0:
            dist.gather(x, None, dst=0)
            return None
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1)
