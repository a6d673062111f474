"""The per-device worker: one tensor-parallel rank's weights, KV cache slice and forward step.

The same class runs in-process (one device) and as a Ray actor (one per device). It knows
nothing of requests or tokenizers: it takes a StepInput of flat arrays and returns, on rank 0,
the rows of logits and hidden states that were asked for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Llama3Config
from ..core.step_input import SamplingInput, StepInput
from ..model.checkpoint import TORCH_DTYPES, Checkpoint, WeightSource
from ..model.parallel import ParallelContext
from ..model.rope import cos_sin_cache
from ..model.sampler import Sampler, SamplerOutput, compute_logprobs
from ..model.transformer import AttentionMetadata, Llama3Transformer

DEFAULT_CPU_KV_CACHE_BYTES = 256 << 20


@dataclass(slots=True)
class StepOutput:
    logits: torch.Tensor | None = None  # [M, V] float32
    hidden_states: torch.Tensor | None = None
    sampled: SamplerOutput | None = None
    prompt_logprobs: list | None = None  # TokenLogprobs per SamplingInput.prompt_rows
    # Where the step's time went on rank 0 (for the engine's overhead figures).
    forward_seconds: float = 0.0
    sample_seconds: float = 0.0


class Worker:
    def __init__(
        self,
        config: Llama3Config,
        checkpoint_path: str,
        rank: int = 0,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        device: str | None = None,
        sampler_seed: int | None = None,
        show_progress: bool = False,
    ):
        self.config = config
        self.sampler = Sampler(sampler_seed)
        self.parallel = ParallelContext(rank, config.tp_degree)
        self.device = torch.device(device or config.devices[rank])
        torch.set_grad_enabled(False)
        self.model = Llama3Transformer(config, self.parallel, self.device)
        checkpoint = Checkpoint(checkpoint_path)
        try:
            self.model.load(WeightSource(checkpoint, config, self.device), show_progress and rank == 0)
        finally:
            checkpoint.close()
        self.cos_sin = cos_sin_cache(config).to(self.device)
        kv = config.kv_params
        if num_kv_blocks is None:
            num_kv_blocks = self._kv_budget(kv_cache_bytes, gpu_memory_utilization) // kv.bytes_per_block_per_device
        if num_kv_blocks < 1:
            raise RuntimeError(
                f"no room for a KV cache block on {self.device} "
                f"({kv.bytes_per_block_per_device} bytes per block); lower the model's memory "
                f"use or pass kv_cache_bytes / num_kv_blocks"
            )
        self.num_kv_blocks = num_kv_blocks
        shape = (num_kv_blocks, kv.block_size, kv.n_kv_heads_per_device, kv.head_dim)
        # Zeroed, not empty: padded decode attention reads (masked) slots of other blocks, and
        # garbage NaNs there would leak through 0 * NaN.
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=TORCH_DTYPES[kv.dtype], device=self.device),
                torch.zeros(shape, dtype=TORCH_DTYPES[kv.dtype], device=self.device),
            )
            for _ in range(kv.num_layers)
        ]

    def _kv_budget(self, kv_cache_bytes: int | None, gpu_memory_utilization: float) -> int:
        """Bytes for the KV cache: as asked, else a share of the GPU's free memory after the weights,
        else a fixed default on CPU (host memory is shared with everything else)."""
        if kv_cache_bytes is not None:
            return kv_cache_bytes
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return max(0, int(total * gpu_memory_utilization) - (total - free))
        return DEFAULT_CPU_KV_CACHE_BYTES

    def parameter_bytes(self) -> dict[str, int]:
        """Bytes of this rank's parameters: sharded ones and those every rank holds whole (each
        layer names its replicated parameters in REPLICATED)."""
        sharded = replicated = 0
        seen: set[int] = set()
        for module in self.model.modules():
            for name, parameter in module.named_parameters(recurse=False):
                if id(parameter) in seen:  # a tied LM head shares the embedding's
                    continue
                seen.add(id(parameter))
                size = parameter.numel() * parameter.element_size()
                if name in getattr(module, "REPLICATED", ()):
                    replicated += size
                else:
                    sharded += size
        return {"sharded": sharded, "replicated": replicated}

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput | None:
        start = time.perf_counter()
        offsets = self._tensor(step.query_start_loc)
        meta = AttentionMetadata(
            positions=self._tensor(step.positions),
            slot_mapping=self._tensor(step.slot_mapping),
            query_start_loc=offsets,
            context_lens=self._tensor(step.context_lens),
            block_tables=self._tensor(step.block_tables),
            is_decode=len(step.tokens) == len(step.context_lens),
        )
        hidden, normed = self.model(self._tensor(step.tokens), meta, self.kv_caches, self.cos_sin)
        logits = self.model.compute_logits(normed[self._tensor(step.logit_rows)])
        if logits is None:  # only rank 0 holds the gathered logits
            return None
        forward_done = time.perf_counter()
        if step.sampling is not None:
            out = self._sample(logits, step.sampling)
        else:
            out = StepOutput(logits=logits)
            if step.hidden_rows is not None:
                out.hidden_states = (normed if step.normalized_hidden else hidden)[self._tensor(step.hidden_rows)]
        out.forward_seconds = forward_done - start
        out.sample_seconds = time.perf_counter() - forward_done
        return out

    def _sample(self, logits: torch.Tensor, s: SamplingInput) -> StepOutput:
        rows = s.sample_rows
        # Usually every row samples, in order: then gathering them would only copy [B, V] floats.
        every_row = len(rows) == logits.shape[0] and np.array_equal(rows, np.arange(len(rows)))
        out = StepOutput(sampled=self.sampler(logits if every_row else logits[self._tensor(rows)], s.metadata))
        if len(s.prompt_rows):
            out.prompt_logprobs = compute_logprobs(
                logits[self._tensor(s.prompt_rows)], s.prompt_targets, s.prompt_num_logprobs
            )
        return out
