"""Tensor-parallel layers (Megatron style, vLLM's names).

Each layer knows its rank and the world size (a ParallelContext) and loads only its shard
through a WeightSource, by the checkpoint names the model passes (model/checkpoint.py's table).
At one device the collectives are no-ops. Each layer says which of its parameters every rank
holds whole (REPLICATED); the others are sharded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import Kernels, cpu, reference
from .checkpoint import WeightSource
from .parallel import ParallelContext


@dataclass(frozen=True, slots=True)
class ShardedPart:
    """Rows [start, stop) of one logical tensor (full_rows rows) that this rank holds."""

    full_rows: int
    start: int
    stop: int


def _parameter(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class _QuantizedWeights:
    """Weight-only quantization of a linear layer, after (or while) loading:
    - quantize_int8() / quantize_fp8(): `weight` becomes int8 / float8_e4m3fn values with a scale
      per output row (weight_scale);
    - quantize_int4(group_size) or use_grouped(weight) (a GGUF tensor read in a grouped form,
      model/gguf.py's GROUPED_TYPES): `grouped` holds the weight in the kernels' layout, and `weight` becomes its
      packed integers, so that counting parameters counts the bytes a step reads. Scales are
      computed over this rank's shard."""

    weight: nn.Parameter
    weight_scale: torch.Tensor | None = None
    grouped: Any = None  # the kernels' packed form of a reference.GroupQuantized
    kernels: Kernels

    @property
    def quantized(self) -> bool:
        return self.weight_scale is not None or self.grouped is not None

    def quantize_int8(self) -> None:
        quantized, scale = reference.quantize_int8(self.weight.data)
        if self.kernels.integer_gemv:
            # One group per row: the integer GEMV (x in int8 blocks) with a float16 scale per row.
            group_size = -(-quantized.shape[1] // 32) * 32
            self.use_grouped(reference.GroupQuantized(quantized, scale.to(torch.float16)[:, None], None, 8, group_size))
            return
        self._use_int8_rows(quantized, scale)

    def _use_int8_rows(self, values: torch.Tensor, scale: torch.Tensor) -> None:
        """`weight` becomes int8 `values` with a float32 scale per row (weight_scale)."""
        dtype = self.weight.dtype
        self.weight = nn.Parameter(values.to(self.weight.device), requires_grad=False)
        scale = scale.float().to(self.weight.device)
        # float32 for the CPU library's GEMV; torch's int8 kernel takes the activations' dtype
        self.weight_scale = scale if self.weight.device.type == "cpu" else scale.to(dtype)

    def quantize_fp8(self) -> None:
        """`weight` becomes float8_e4m3fn with a float32 scale per output row (weight_scale)."""
        quantized, scale = reference.quantize_fp8(self.weight.data)
        self.weight = nn.Parameter(quantized, requires_grad=False)
        self.weight_scale = scale

    def quantize_int4(self, group_size: int) -> None:
        self.use_grouped(reference.quantize_int4(self.weight.data, group_size))

    def use_grouped(self, weight: reference.GroupQuantized, head: bool = False) -> None:
        """head: the LM head's packing (Kernels.pack_head: x never rounded to int8). 8-bit weights
        with one group a row (quantize_int8's, int8 checkpoints' with a scale per channel) take
        the integer GEMV where it runs (x in int8 blocks, a float16 scale per row), else become
        int8 values with weight_scale (the int8 kernels of every device)."""
        if weight.bits == 8 and weight.scales.shape[1] == 1 and not head and not self.kernels.integer_gemv:
            self._use_int8_rows(weight.values, weight.scales[:, 0])
            return
        weight = weight.to(self.weight.device)
        self.grouped = self.kernels.pack_head(weight) if head else self.kernels.pack_grouped(weight)
        packed = getattr(self.grouped, "words", weight.values)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight_scale = None

    def _project(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.grouped is not None:
            return self.kernels.grouped_linear(x, self.grouped, bias)
        if self.weight_scale is not None:
            if self.weight.dtype == torch.float8_e4m3fn:
                return self.kernels.fp8_linear(x, self.weight, self.weight_scale, bias)
            return self.kernels.int8_linear(x, self.weight, self.weight_scale, bias)
        return self.kernels.linear(x, self.weight, bias)

    def _keeps_stored(self, source: WeightSource) -> bool:
        """Whether group-quantized tensors are kept as stored: the kernels multiply them without
        dequantizing and no quantization was asked for (which requantizes dense weights)."""
        return self.kernels.runs_grouped and source.config.quantization is None

    def _read_grouped(
        self, source: WeightSource, name: str, shape: tuple[int, ...], cols: tuple[int, int] | None = None
    ) -> bool:
        """Reads `name` as stored when it is a group-quantized GGUF type and these kernels multiply
        it without dequantizing; False (nothing read) otherwise."""
        if not self._keeps_stored(source):
            return False
        weight = source.read_grouped(name, shape, cols=cols)
        if weight is None:
            return False
        self.use_grouped(weight)
        return True


def _one_form(parts: list[reference.GroupQuantized]) -> list[reference.GroupQuantized]:
    """Fused parts (q|k|v, gate|up) in one grouped form, to be packed as one weight: as they are
    when they share one, else each part not already 8 bits in groups of 32 requantized to that
    (GGUF Q4_K_M files keep v of some layers in Q6_K beside Q4_K q and k: dense bfloat16 q|k|v
    would read twice the bytes of 8 bits; each value moves by at most 1/254 of its group's
    largest |w|, under 1/17 of a 4-bit step)."""
    if len({(p.bits, p.group_size) for p in parts}) == 1:
        return parts
    return [
        p if (p.bits, p.group_size) == (8, 32) else reference.quantize_int8_groups(reference.dequantize(p))
        for p in parts
    ]


class ColumnParallelLinear(_QuantizedWeights, nn.Module):
    """Output features split across ranks; several logical weights may be fused into one GEMM."""

    REPLICATED: ClassVar[tuple[str, ...]] = ()

    def __init__(self, input_size: int, parts: list[ShardedPart], bias: bool, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.parts = parts
        self.input_size = input_size
        self.output_sizes = [part.stop - part.start for part in parts]
        self.weight = _parameter(sum(self.output_sizes), input_size, dtype=dtype)
        self.bias = _parameter(sum(self.output_sizes), dtype=dtype) if bias else None

    def load(self, source: WeightSource, names: list[str]) -> None:
        """names: the checkpoint name (without .weight) of each logical part, in order."""
        grouped = [
            source.read_grouped(f"{name}.weight", (part.full_rows, self.input_size), rows=(part.start, part.stop))
            if self._keeps_stored(source)
            else None
            for name, part in zip(names, self.parts, strict=True)
        ]
        if all(weight is not None for weight in grouped):
            self.use_grouped(reference.GroupQuantized.cat(_one_form(grouped)))  # type: ignore[arg-type]
        else:
            self._load_dense(source, names)
        if self.bias is not None:
            self.bias.data = torch.cat(
                [
                    source.read(f"{name}.bias", (part.full_rows,), rows=(part.start, part.stop))
                    for name, part in zip(names, self.parts, strict=True)
                ]
            )

    def _load_dense(self, source: WeightSource, names: list[str]) -> None:
        self.weight.data = torch.cat(
            [
                source.read(f"{name}.weight", (part.full_rows, self.input_size), rows=(part.start, part.stop))
                for name, part in zip(names, self.parts, strict=True)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._project(x, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v fused: this rank's query heads and its KV heads (replicated when tp > n_kv)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        dtype: torch.dtype,
        parallel: ParallelContext,
        kernels: Kernels,
    ):
        q_start, q_stop = parallel.shard(num_heads)
        if parallel.world_size <= num_kv_heads:
            kv_start, kv_stop = parallel.shard(num_kv_heads)
        else:  # one KV head per rank: ranks r*n_kv/tp .. share head r*n_kv//tp
            kv_start = parallel.rank * num_kv_heads // parallel.world_size
            kv_stop = kv_start + 1
        self.num_heads, self.num_kv_heads = q_stop - q_start, kv_stop - kv_start
        kv_part = ShardedPart(num_kv_heads * head_dim, kv_start * head_dim, kv_stop * head_dim)
        super().__init__(
            hidden_size,
            [ShardedPart(num_heads * head_dim, q_start * head_dim, q_stop * head_dim), kv_part, kv_part],
            bias,
            dtype,
            kernels,
        )


class MergedColumnParallelLinear(ColumnParallelLinear):
    """gate and up fused as [gate | up] of this rank's slice of the intermediate features."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool,
        dtype: torch.dtype,
        parallel: ParallelContext,
        kernels: Kernels,
    ):
        start, stop = parallel.shard(intermediate_size)
        part = ShardedPart(intermediate_size, start, stop)
        super().__init__(hidden_size, [part, part], bias, dtype, kernels)


class RowParallelLinear(_QuantizedWeights, nn.Module):
    """Input features split across ranks; partial sums all-reduced; the bias added once after."""

    REPLICATED: ClassVar[tuple[str, ...]] = ("bias",)

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        dtype: torch.dtype,
        parallel: ParallelContext,
        kernels: Kernels,
    ):
        super().__init__()
        self.parallel = parallel
        self.kernels = kernels
        self.columns = parallel.shard(input_size)
        self.full_shape = (output_size, input_size)
        self.weight = _parameter(output_size, self.columns[1] - self.columns[0], dtype=dtype)
        self.bias = _parameter(output_size, dtype=dtype) if bias else None

    def load(self, source: WeightSource, name: str) -> None:
        if not self._read_grouped(source, f"{name}.weight", self.full_shape, cols=self.columns):
            self.weight.data = source.read(f"{name}.weight", self.full_shape, cols=self.columns)
        if self.bias is not None:
            self.bias.data = source.read(f"{name}.bias", self.full_shape[:1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.parallel.all_reduce(self._project(x, None))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows of the vocabulary split across ranks; ids outside a rank's range give zeros there."""

    REPLICATED: ClassVar[tuple[str, ...]] = ()

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, parallel: ParallelContext):
        super().__init__()
        self.parallel = parallel
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        per_rank = -(-vocab_size // parallel.world_size)  # the last shard is padded when V does not divide
        self.start = parallel.rank * per_rank
        self.stop = min(self.start + per_rank, vocab_size)
        self.per_rank = per_rank
        self.weight = _parameter(per_rank, hidden_size, dtype=dtype)

    def load(self, source: WeightSource, name: str) -> None:
        self.weight.data = self.read_rows(source, name)

    def read_rows(self, source: WeightSource, name: str) -> torch.Tensor:
        """This rank's rows of a [vocab, hidden] tensor, zero-padded to per_rank rows."""
        rows = source.read(name, (self.vocab_size, self.hidden_size), rows=(self.start, self.stop))
        return F.pad(rows, (0, 0, 0, self.per_rank - rows.shape[0]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.world_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.stop)
        out = F.embedding((ids - self.start).masked_fill(outside, 0), self.weight)
        return self.parallel.all_reduce(out.masked_fill(outside[:, None], 0))


class ParallelLMHead(_QuantizedWeights, nn.Module):
    """Vocabulary-parallel output projection gathered to rank 0; tied heads share the embedding
    shard. A head (or tied embedding) stored group-quantized in a GGUF file runs as stored where
    the kernels multiply it so (the embedding keeps a dense copy for its lookups): on a small
    model the head is the largest weight a decode step reads."""

    REPLICATED: ClassVar[tuple[str, ...]] = ()

    def __init__(self, embedding: VocabParallelEmbedding, tied: bool, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.embedding = embedding
        self.tied = tied
        self.weight = embedding.weight if tied else _parameter(*embedding.weight.shape, dtype=embedding.weight.dtype)

    def load(self, source: WeightSource, name: str, embedding_name: str) -> None:
        stored = embedding_name if self.tied else name
        if self.tied:
            source.skip(name)  # some exporters write the tied copy too; it is the same tensor
        if self._keeps_stored(source):
            embedding = self.embedding
            grouped = source.read_grouped(
                stored, (embedding.vocab_size, embedding.hidden_size), rows=(embedding.start, embedding.stop)
            )
            if grouped is not None:
                # Logits are where x's rounding to int8 shows: a near-tie between the top two tokens
                # flips (SmolLM2 in bfloat16 answered "L'Étoile" instead of "The capital ... Paris").
                self.use_grouped(_padded_rows(grouped, embedding.per_rank), head=True)
                return
        if not self.tied:
            self.weight.data = self.embedding.read_rows(source, name)

    def projection_weight(self) -> cpu.ProjectionWeight | None:
        """The head's weight as the kernels multiply it (packed panels or dense rows), or None
        where it runs otherwise (int8 rows with a scale, FP8)."""
        if self.grouped is not None:
            return self.grouped
        return None if self.weight_scale is not None else self.weight.data

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits [n, V] on rank 0, None elsewhere."""
        logits = self.embedding.parallel.gather_last_dim(self._project(hidden, None))
        return None if logits is None else logits[:, : self.embedding.vocab_size].float()


def _padded_rows(weight: reference.GroupQuantized, rows: int) -> reference.GroupQuantized:
    """weight with zero rows appended up to `rows` (the last vocabulary shard's padding)."""
    extra = rows - weight.shape[0]
    if extra == 0:
        return weight
    offsets = None if weight.offsets is None else F.pad(weight.offsets, (0, 0, 0, extra))
    factors = None if weight.factors is None else F.pad(weight.factors, (0, 0, 0, 0, 0, extra))
    return reference.GroupQuantized(
        F.pad(weight.values, (0, 0, 0, extra)), F.pad(weight.scales, (0, 0, 0, extra)), offsets, weight.bits,
        weight.group_size, factors,
    )  # fmt: skip


class Norm(nn.Module):
    """RMSNorm (learned weight) or LayerNorm without learned parameters (OLMo), fused with the
    residual add: forward(x, residual) returns (norm(x + residual), x + residual)."""

    REPLICATED: ClassVar[tuple[str, ...]] = ("weight",)

    def __init__(self, hidden_size: int, eps: float, method: str, affine: bool, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        self.kernels = kernels
        self.eps, self.method, self.hidden_size = eps, method, hidden_size
        self.weight = _parameter(hidden_size, dtype=dtype) if affine else None

    def load(self, source: WeightSource, name: str) -> None:
        """name: the checkpoint name of the weight (with .weight)."""
        if self.weight is not None:
            self.weight.data = source.read(name, (self.hidden_size,))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "rms_norm":
            return self.kernels.rms_norm(x, self.weight, self.eps, residual)
        hidden = x if residual is None else x + residual
        out = F.layer_norm(hidden.float(), (self.hidden_size,), eps=self.eps).to(hidden.dtype)
        return (out if self.weight is None else out * self.weight), hidden
