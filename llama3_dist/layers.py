"""Tensor-parallel layers (Megatron style, vLLM's names).

Each layer knows its rank and the world size (a ParallelContext) and loads only its shard
through a WeightSource. At one device the collectives are no-ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import WeightSource
from .kernels import Kernels
from .parallel import ParallelContext


@dataclass(frozen=True, slots=True)
class ShardedPart:
    """Rows [start, stop) of the logical tensor `name` (full_rows rows) that this rank holds."""
    name: str
    full_rows: int
    start: int
    stop: int


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """Output features split across ranks; several logical weights may be fused into one GEMM."""

    def __init__(self, input_size: int, parts: list[ShardedPart], bias: bool, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.parts = parts
        self.input_size = input_size
        self.output_sizes = [p.stop - p.start for p in parts]
        self.weight = _param(sum(self.output_sizes), input_size, dtype=dtype)
        self.bias = _param(sum(self.output_sizes), dtype=dtype) if bias else None

    def load(self, source: WeightSource, prefix: str) -> None:
        self.weight.data = torch.cat([source.read(f"{prefix}.{p.name}.weight", (p.full_rows, self.input_size),
                                                  rows=(p.start, p.stop)) for p in self.parts])
        if self.bias is not None:
            self.bias.data = torch.cat([source.read(f"{prefix}.{p.name}.bias", (p.full_rows,),
                                                    rows=(p.start, p.stop)) for p in self.parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v fused: this rank's query heads and its KV heads (replicated when tp > n_kv)."""

    def __init__(self, hidden: int, head_dim: int, n_heads: int, n_kv_heads: int, bias: bool,
                 dtype: torch.dtype, pc: ParallelContext, kernels: Kernels, names=("q_proj", "k_proj", "v_proj")):
        q0, q1 = pc.shard(n_heads)
        if pc.world_size <= n_kv_heads:
            k0, k1 = pc.shard(n_kv_heads)
        else:  # one KV head per rank: ranks r*n_kv/tp .. share head r*n_kv//tp
            k0 = pc.rank * n_kv_heads // pc.world_size
            k1 = k0 + 1
        self.n_heads, self.n_kv_heads = q1 - q0, k1 - k0
        d = head_dim
        super().__init__(hidden, [ShardedPart(names[0], n_heads * d, q0 * d, q1 * d),
                                  ShardedPart(names[1], n_kv_heads * d, k0 * d, k1 * d),
                                  ShardedPart(names[2], n_kv_heads * d, k0 * d, k1 * d)], bias, dtype, kernels)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """gate and up fused as [gate | up] of this rank's slice of the intermediate features."""

    def __init__(self, hidden: int, intermediate: int, bias: bool, dtype: torch.dtype, pc: ParallelContext,
                 kernels: Kernels):
        i0, i1 = pc.shard(intermediate)
        super().__init__(hidden, [ShardedPart("gate_proj", intermediate, i0, i1),
                                  ShardedPart("up_proj", intermediate, i0, i1)], bias, dtype, kernels)


class RowParallelLinear(nn.Module):
    """Input features split across ranks; partial sums all-reduced; the bias added once after."""

    def __init__(self, input_size: int, output_size: int, bias: bool, dtype: torch.dtype, pc: ParallelContext,
                 kernels: Kernels):
        super().__init__()
        self.pc = pc
        self.kernels = kernels
        self.cols = pc.shard(input_size)
        self.full_shape = (output_size, input_size)
        self.weight = _param(output_size, self.cols[1] - self.cols[0], dtype=dtype)
        self.bias = _param(output_size, dtype=dtype) if bias else None

    def load(self, source: WeightSource, prefix: str) -> None:
        self.weight.data = source.read(f"{prefix}.weight", self.full_shape, cols=self.cols)
        if self.bias is not None:
            self.bias.data = source.read(f"{prefix}.bias", self.full_shape[:1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pc.all_reduce(self.kernels.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows of the vocabulary split across ranks; ids outside a rank's range give zeros there."""

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, pc: ParallelContext):
        super().__init__()
        self.pc = pc
        self.vocab_size, self.hidden = vocab_size, hidden
        per = -(-vocab_size // pc.world_size)  # the last shard is padded when V does not divide
        self.start = pc.rank * per
        self.stop = min(self.start + per, vocab_size)
        self.per_rank = per
        self.weight = _param(per, hidden, dtype=dtype)

    def load(self, source: WeightSource, name: str) -> None:
        rows = source.read(name, (self.vocab_size, self.hidden), rows=(self.start, self.stop))
        self.weight.data = F.pad(rows, (0, 0, 0, self.per_rank - rows.shape[0]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pc.world_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.stop)
        out = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        return self.pc.all_reduce(out.masked_fill(outside[:, None], 0))


class ParallelLMHead(nn.Module):
    """Vocabulary-parallel output projection gathered to rank 0; tied heads share the embedding shard."""

    def __init__(self, embedding: VocabParallelEmbedding, tied: bool, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.embedding = embedding
        self.tied = tied
        self.weight = embedding.weight if tied else _param(*embedding.weight.shape, dtype=embedding.weight.dtype)

    def load(self, source: WeightSource, name: str) -> None:
        if self.tied:
            if source.has(name):  # some exporters write the tied copy too; it is the same tensor
                source.checkpoint.consumed.add(name)
        else:
            e = self.embedding
            rows = source.read(name, (e.vocab_size, e.hidden), rows=(e.start, e.stop))
            self.weight.data = F.pad(rows, (0, 0, 0, e.per_rank - rows.shape[0]))

    def forward(self, h: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits [n, V] on rank 0, None elsewhere."""
        logits = self.embedding.pc.gather_last_dim(self.kernels.linear(h, self.weight))
        return None if logits is None else logits[:, :self.embedding.vocab_size].float()


class Norm(nn.Module):
    """RMSNorm (learned weight) or LayerNorm without learned parameters (OLMo), fused with the
    residual add: forward(x, residual) returns (norm(x + residual), x + residual)."""

    def __init__(self, hidden: int, eps: float, method: str, affine: bool, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.eps, self.method, self.hidden = eps, method, hidden
        self.weight = _param(hidden, dtype=dtype) if affine else None

    def load(self, source: WeightSource, prefix: str) -> None:
        if self.weight is not None:
            self.weight.data = source.read(f"{prefix}.weight", (self.hidden,))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "rms_norm":
            return self.kernels.rms_norm(x, self.weight, self.eps, residual)
        h = x if residual is None else x + residual
        out = F.layer_norm(h.float(), (self.hidden,), eps=self.eps).to(h.dtype)
        return (out if self.weight is None else out * self.weight), h
