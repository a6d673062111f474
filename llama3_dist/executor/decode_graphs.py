"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small batch is hundreds of small kernels, and launching them one by one from
Python takes longer than running them. So each bucket size (1, 2, 4, 8, 16, 24, ... up to the
engine's max_num_seqs) is captured once, after the KV cache is allocated: the forward over every
layer (at TP>1 with its NCCL all-reduces) and the LM head, reading static input buffers and
writing the logits into one static output buffer. A step copies its arrays into those buffers,
padded up to its bucket, and replays the graph. Padding rows store no K/V (slot -1), attend to
one key of block 0 (the cache is zeroed, so it is finite) and their logits are never read.

Everything but the capture is device-neutral: off CUDA, `capture` does nothing and `run`
executes the padded batch eagerly on the same buffers, so bucket choice, padding and buffer
reuse are tested on a CPU.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..core.step_input import StepInput
from ..model.transformer import AttentionMetadata, Llama3Transformer


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then multiples of 8, and max_num_seqs itself, so every decode batch has a bucket."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = {size for size in (1, 2, 4) if size <= max_num_seqs}
    sizes.update(range(8, max_num_seqs + 1, 8))
    sizes.add(max_num_seqs)
    return sorted(sizes)


class DecodeGraphs:
    """The captured decode forward of one rank, per bucket of batch sizes."""

    def __init__(
        self,
        model: Llama3Transformer,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        cos_sin: torch.Tensor,
        sizes: list[int],
        max_blocks_per_sequence: int,
        device: torch.device,
    ):
        self.model, self.kv_caches, self.cos_sin = model, kv_caches, cos_sin
        self.sizes = sorted(sizes)
        self.max_blocks_per_sequence = max_blocks_per_sequence
        self.device = device
        largest = self.sizes[-1]
        with torch.device(device):
            self.tokens = torch.zeros(largest, dtype=torch.int64)
            self.positions = torch.zeros(largest, dtype=torch.int64)
            self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64)
            self.context_lens = torch.ones(largest, dtype=torch.int32)
            self.block_tables = torch.zeros(largest, max_blocks_per_sequence, dtype=torch.int32)
            self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32)
        self.logits: torch.Tensor | None = None  # [largest, V] float32 on rank 0, made by the first forward
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def bucket(self, batch: int) -> int | None:
        """The smallest captured size that holds `batch` sequences; None past the largest."""
        return next((size for size in self.sizes if size >= batch), None)

    def serves(self, step: StepInput) -> bool:
        """A pure decode step (one new token per sequence, a logits row each, no hidden states)
        that fits a bucket and the static block table."""
        batch = len(step.tokens)
        return (
            batch == len(step.context_lens)
            and batch <= self.max_batch
            and step.hidden_rows is None
            and step.block_tables.shape[1] <= self.max_blocks_per_sequence
            and len(step.logit_rows) == batch
            and np.array_equal(step.logit_rows, np.arange(batch))
        )

    def capture(self) -> None:
        """Captures every bucket, largest first so that the smaller graphs reuse its memory pool.
        Off CUDA there is nothing to capture."""
        if self.device.type != "cuda":
            return
        started = time.perf_counter()
        torch.cuda.synchronize(self.device)
        free_before, _ = torch.cuda.mem_get_info(self.device)
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._pad(0, size)
            self._forward(size)  # warm-up: compiles the Triton kernels, sizes cuBLAS workspaces
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        self.capture_seconds = time.perf_counter() - started
        self.capture_bytes = max(0, free_before - free_after)

    def run(self, step: StepInput, tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """The step's logits [batch, V] (rank 0; None on the others): a view of the static
        output buffer, valid until the next run. tokens: the step's token ids already on the
        device (else step.tokens)."""
        batch = len(step.tokens)
        size = self.bucket(batch)
        if size is None or not self.serves(step):
            raise ValueError(f"a decode step of {batch} sequences is not served by the buckets {self.sizes}")
        self._fill(step)
        if tokens is not None:
            self.tokens[:batch].copy_(tokens)
        self._pad(batch, size)
        if size in self.graphs:
            self.graphs[size].replay()
        else:
            self._forward(size)
        return None if self.logits is None else self.logits[:batch]

    # --- internals ----------------------------------------------------------------------------
    def _fill(self, step: StepInput) -> None:
        batch, width = len(step.tokens), step.block_tables.shape[1]
        for static, array in (
            (self.tokens, step.tokens),
            (self.positions, step.positions),
            (self.slot_mapping, step.slot_mapping),
            (self.context_lens, step.context_lens),
        ):
            static[:batch].copy_(torch.from_numpy(array), non_blocking=True)
        # Columns past `width` keep older ids: attention reads only a sequence's first
        # ceil(context / block_size) entries, all within `width`.
        self.block_tables[:batch, :width].copy_(torch.from_numpy(step.block_tables), non_blocking=True)

    def _pad(self, start: int, stop: int) -> None:
        """Rows [start, stop) become padding: no K/V stored, one key of block 0 attended."""
        if start >= stop:
            return
        self.tokens[start:stop] = 0
        self.positions[start:stop] = 0
        self.slot_mapping[start:stop] = -1
        self.context_lens[start:stop] = 1
        self.block_tables[start:stop, 0] = 0

    def _forward(self, size: int) -> None:
        meta = AttentionMetadata(
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            context_lens=self.context_lens[:size],
            block_tables=self.block_tables[:size],
            is_decode=True,
            max_query_len=1,
        )
        _, normed = self.model(self.tokens[:size], meta, self.kv_caches, self.cos_sin)
        logits = self.model.compute_logits(normed)
        if logits is None:  # not rank 0
            return
        if self.logits is None:  # allocated once, outside any graph, for the largest bucket
            self.logits = torch.empty(self.max_batch, logits.shape[1], dtype=logits.dtype, device=self.device)
        self.logits[:size].copy_(logits)
