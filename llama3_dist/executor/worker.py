"""The per-device worker: one tensor-parallel rank's weights, KV cache slice and forward step.

The same class runs in-process (one device) and as a Ray actor (one per device). It knows
nothing of requests or tokenizers: it takes a StepInput of flat arrays and returns, on rank 0,
the rows of logits and hidden states that were asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Llama3Config
from ..core.step_input import SamplingInput, StepInput
from ..model.checkpoint import TORCH_DTYPES, DummyWeights, WeightSource, open_checkpoint
from ..model.gguf import release_readers
from ..model.parallel import ParallelContext
from ..model.rope import cos_sin_cache
from ..model.sampler import Sampler, SamplerOutput, compute_logprobs
from ..model.transformer import AttentionMetadata, Llama3Transformer
from .decode_graphs import DecodeGraphs, capture_sizes

log = logging.getLogger("llama3_dist")

DEFAULT_CPU_KV_CACHE_BYTES = 256 << 20
# Kept free on a GPU besides the profiled peak: allocator fragmentation, NCCL's own buffers
# (outside torch's allocator) and the decode graphs' memory pool.
GPU_MEMORY_MARGIN_BYTES = 512 << 20


@dataclass(slots=True)
class StepOutput:
    logits: torch.Tensor | None = None  # [M, V] float32
    hidden_states: torch.Tensor | None = None
    sampled: SamplerOutput | None = None
    prompt_logprobs: list | None = None  # TokenLogprobs per SamplingInput.prompt_rows
    # An engine step's StepInput.hidden_rows (embedding requests): final-norm hidden states,
    # float32 on the host, full width (the all-reduce has run), one row per asked-for token.
    pooled_hidden: np.ndarray | None = None
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
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        enforce_eager: bool = False,
        load_format: str = "auto",
    ):
        """max_num_seqs / max_num_batched_tokens: the largest steps the caller will send (the
        GPU memory profile and the decode graphs are sized for them); enforce_eager: no CUDA
        graphs; load_format "dummy": random weights instead of the checkpoint's (benchmarks)."""
        self.config = config
        self.sampler = Sampler(sampler_seed)
        self.parallel = ParallelContext(rank, config.tp_degree)
        self.device = torch.device(device or config.devices[rank])
        torch.set_grad_enabled(False)
        with self.device_scope():
            self._load(checkpoint_path, show_progress and rank == 0, load_format)
            self._allocate_kv_cache(
                num_kv_blocks, kv_cache_bytes, gpu_memory_utilization, max_num_seqs, max_num_batched_tokens
            )
            self.decode_graphs: DecodeGraphs | None = None
            self._last_sampled: torch.Tensor | None = None  # the latest step's sampled token ids
            if self.device.type == "cuda" and not enforce_eager:
                if self.model.kernels.capture_safe:
                    self._capture_decode_graphs(max_num_seqs)
                elif rank == 0:
                    log.info("no CUDA graphs: the kernels chosen (LLAMA3_DIST_KERNELS) wait for the device")

    def device_scope(self) -> contextlib.AbstractContextManager:
        """Makes this rank's GPU the current CUDA device: Triton launches on the calling thread's
        current device, and steps arrive on other threads (Ray's compiled graph, the server's
        engine thread) than the one that built the worker."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _load(self, checkpoint_path: str, show_progress: bool, load_format: str) -> None:
        self.model = Llama3Transformer(self.config, self.parallel, self.device)
        if load_format == "dummy":
            self.model.load(DummyWeights(self.config, self.device), show_progress)
        else:
            checkpoint = open_checkpoint(checkpoint_path)
            try:
                self.model.load(WeightSource(checkpoint, self.config, self.device), show_progress)
            finally:
                checkpoint.close()
                release_readers()
        self.cos_sin = cos_sin_cache(self.config).to(self.device)
        _return_freed_heap()

    def _allocate_kv_cache(
        self,
        num_kv_blocks: int | None,
        kv_cache_bytes: int | None,
        gpu_memory_utilization: float,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        kv = self.config.kv_params
        if num_kv_blocks is None:
            budget = self._kv_budget(kv_cache_bytes, gpu_memory_utilization, max_num_seqs, max_num_batched_tokens)
            num_kv_blocks = budget // kv.bytes_per_block_per_device
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

    def _kv_budget(
        self, kv_cache_bytes: int | None, gpu_memory_utilization: float, max_num_seqs: int, max_num_batched_tokens: int
    ) -> int:
        """Bytes for the KV cache: as asked; on a GPU, gpu_memory_utilization of its memory less
        what is in use once a collective has run (NCCL binds its buffers then) and the largest
        steps have been run (activations, cuBLAS workspaces, rank 0's gathered logits), less a
        margin; on a CPU a fixed default (host memory is shared with everything else)."""
        if kv_cache_bytes is not None:
            return kv_cache_bytes
        if self.device.type != "cuda":
            return DEFAULT_CPU_KV_CACHE_BYTES
        peak = self._profile_peak_activations(max_num_seqs, max_num_batched_tokens)
        free, total = torch.cuda.mem_get_info(self.device)
        # Memory in use now, plus what the profiled steps held at their peak beyond it.
        return max(0, int(total * gpu_memory_utilization) - (total - free) - peak - GPU_MEMORY_MARGIN_BYTES)

    def _profile_peak_activations(self, max_num_seqs: int, max_num_batched_tokens: int) -> int:
        """Runs a collective, then the largest prefill-sized and decode-sized forwards (with the
        LM head) on a one-block KV cache whose slots are never written; returns the peak bytes
        they allocated beyond what was allocated before."""
        self.parallel.all_reduce(torch.zeros(1, device=self.device))
        kv = self.config.kv_params
        shape = (1, kv.block_size, kv.n_kv_heads_per_device, kv.head_dim)
        dtype = TORCH_DTYPES[kv.dtype]
        caches = [
            (torch.zeros(shape, dtype=dtype, device=self.device), torch.zeros(shape, dtype=dtype, device=self.device))
            for _ in range(kv.num_layers)
        ]
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        with torch.inference_mode():
            # Each token a one-token sequence attending to one (zeroed) key: the activations of a
            # full token budget without a KV cache to hold its context.
            for tokens, logit_rows in ((max_num_batched_tokens, max_num_seqs), (max_num_seqs, max_num_seqs)):
                meta = AttentionMetadata(
                    positions=torch.zeros(tokens, dtype=torch.int64, device=self.device),
                    slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=self.device),
                    query_start_loc=torch.arange(tokens + 1, dtype=torch.int32, device=self.device),
                    context_lens=torch.ones(tokens, dtype=torch.int32, device=self.device),
                    block_tables=torch.zeros(tokens, 1, dtype=torch.int32, device=self.device),
                    is_decode=True,
                    max_query_len=1,
                )
                _, normed = self.model(
                    torch.zeros(tokens, dtype=torch.int64, device=self.device), meta, caches, self.cos_sin
                )
                self.model.compute_logits(normed[: min(logit_rows, tokens)])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del caches
        torch.cuda.empty_cache()
        return peak

    def _capture_decode_graphs(self, max_num_seqs: int) -> None:
        block_size = self.config.kv_params.block_size
        self.decode_graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            self.cos_sin,
            capture_sizes(max_num_seqs),
            -(-self.config.max_seq_len // block_size),
            self.device,
        )
        with torch.inference_mode():
            self.decode_graphs.capture()
        if self.parallel.rank == 0:
            graphs = self.decode_graphs
            log.info(
                "CUDA graphs: decode batches of %s captured in %.1f s, %.0f MiB",
                ",".join(map(str, graphs.sizes)),
                graphs.capture_seconds,
                graphs.capture_bytes / 2**20,
            )

    def close(self) -> None:
        """Drops the weights, the KV cache and the graphs, and returns the GPU memory to the
        device (another model in this process, or a rank of another engine, may need it)."""
        self.decode_graphs = None
        self.kv_caches = []
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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
        tensor = torch.from_numpy(array)
        # On a CPU rank that is the tensor; a .to() would cost a dispatch each (several a step).
        return tensor if self.device.type == "cpu" else tensor.to(self.device, non_blocking=True)

    def execute(self, step: StepInput) -> StepOutput | None:
        """Runs the step; rank 0's output (None on the other ranks)."""
        return self.launch(step).result()

    @torch.inference_mode()
    def launch(self, step: StepInput) -> WorkerStep:
        """Queues the step's work on the device and returns before it has run: the sampled token
        ids stay on the device (the next step's inputs may take them from there, see
        StepInput.previous_rows) while a copy to the host is under way. result() waits for it.
        On a CPU everything has run when this returns."""
        with self.device_scope():
            timer = _StepTimer(self.device)
            hidden = normed = None
            tokens = self._input_tokens(step)
            if self.decode_graphs is not None and self.decode_graphs.serves(step):
                logits = self.decode_graphs.run(step, tokens)
                if logits is not None and step.sampling is None:
                    logits = logits.clone()  # the graphs' output buffer is overwritten by the next step
            else:
                # Host-side facts the forward would otherwise take from the tensors (a device sync
                # on GPUs, a few tensor operations a step on CPUs).
                is_decode = len(step.tokens) == len(step.context_lens)
                meta = AttentionMetadata(
                    positions=self._tensor(step.positions),
                    slot_mapping=self._tensor(step.slot_mapping),
                    query_start_loc=self._tensor(step.query_start_loc),
                    context_lens=self._tensor(step.context_lens),
                    block_tables=self._tensor(step.block_tables),
                    is_decode=is_decode,
                    max_query_len=1 if is_decode else int(np.diff(step.query_start_loc).max(initial=0)),
                    first_position=bool(len(step.positions)) and int(step.positions.min()) == 0,
                )
                hidden, normed = self.model(tokens, meta, self.kv_caches, self.cos_sin)
                rows = step.logit_rows
                # Decode steps take every row (logit_rows ascend: all N of them end at N - 1).
                every_row = len(rows) == normed.shape[0] and (len(rows) == 0 or int(rows[-1]) == len(rows) - 1)
                logits = self.model.compute_logits(normed if every_row else normed[self._tensor(rows)])
            if logits is None:  # only rank 0 holds the gathered logits
                return WorkerStep(None, timer)
            timer.forward_done()
            if step.sampling is not None:
                out = self._sample(logits, step.sampling)
                assert out.sampled is not None
                if step.hidden_rows is not None:  # decode graphs never serve a step with hidden_rows
                    assert normed is not None
                    out.pooled_hidden = normed[self._tensor(step.hidden_rows)].float().cpu().numpy()
                device_ids = out.sampled.device_token_ids
                self._last_sampled = device_ids if device_ids is not None else self._tensor(out.sampled.token_ids)
                if device_ids is not None:
                    return WorkerStep(out, timer, _to_host(device_ids))
            else:
                out = StepOutput(logits=logits)
                if step.hidden_rows is not None:
                    assert hidden is not None and normed is not None  # graphs never serve hidden states
                    out.hidden_states = (normed if step.normalized_hidden else hidden)[self._tensor(step.hidden_rows)]
            return WorkerStep(out, timer)

    def _input_tokens(self, step: StepInput) -> torch.Tensor:
        """The step's token ids on the device, those marked in previous_rows taken from the
        previous step's sampled tokens, which may still be on their way to the host."""
        tokens = self._tensor(step.tokens)
        if step.previous_rows is not None:
            positions = np.flatnonzero(step.previous_rows >= 0)
            if len(positions):
                if self._last_sampled is None:
                    raise RuntimeError("a step takes tokens from the previous step, but none was sampled here")
                tokens[self._tensor(positions)] = self._last_sampled[self._tensor(step.previous_rows[positions])]
        return tokens

    def _sample(self, logits: torch.Tensor, s: SamplingInput) -> StepOutput:
        rows = s.sample_rows
        # Usually every row samples, in order: then gathering them would only copy [B, V] floats.
        # The rows ascend (one per sampling sequence, in step order): all B of them end at B - 1.
        every_row = len(rows) == logits.shape[0] and (len(rows) == 0 or int(rows[-1]) == len(rows) - 1)
        # The sampler may mask in place: the logits (or the gathered rows) are not read after it
        # except for prompt logprobs, which come from other rows (every_row means there are none).
        sampled = self.sampler(
            logits if every_row else logits[self._tensor(rows)],
            s.metadata,
            keep_on_device=self.device.type == "cuda",
            scratch=True,
        )
        out = StepOutput(sampled=sampled)
        if len(s.prompt_rows):
            out.prompt_logprobs = compute_logprobs(
                logits[self._tensor(s.prompt_rows)], s.prompt_targets, s.prompt_num_logprobs
            )
        return out


def _return_freed_heap() -> None:
    """Gives the C heap's free pages back to the system (glibc's malloc_trim). A load that
    quantizes or converts the weights frees about as much as it keeps, and glibc keeps that
    freed memory for later allocations: a Llama-3.2-3B-shaped int8 load held 6.7 GB of RSS, 4.5 GB
    after the trim. Where the C library has no malloc_trim (musl, macOS), nothing is done."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _to_host(device_ids: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
    """A copy of device_ids into pinned host memory, under way, and the event that marks its end."""
    host = torch.empty(device_ids.shape, dtype=device_ids.dtype, pin_memory=True)
    host.copy_(device_ids, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


class WorkerStep:
    """A launched step (Worker.launch): result() waits for its sampled tokens to reach the host
    and returns rank 0's StepOutput (None on the other ranks)."""

    def __init__(
        self, output: StepOutput | None, timer: _StepTimer, copy: tuple[torch.Tensor, torch.cuda.Event] | None = None
    ):
        timer.launched()
        self._output, self._timer, self._copy = output, timer, copy
        self._done = False

    def result(self) -> StepOutput | None:
        out = self._output
        if out is None or self._done:
            return out
        self._done = True
        if self._copy is not None:
            host, event = self._copy
            event.synchronize()
            assert out.sampled is not None
            out.sampled.token_ids = host.numpy().copy()
            out.sampled.device_token_ids = None
        out.forward_seconds, out.sample_seconds = self._timer.seconds()
        return out


class _StepTimer:
    """Where a step's time went on this rank: the forward and the sampling. On a GPU the launches
    return at once, so the device's own time is taken from CUDA events (read once the step's
    results are back on the host)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.start = time.perf_counter()
        self.forward_end = self.end = self.start
        if self.cuda:
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            self.events[0].record()

    def forward_done(self) -> None:
        self.forward_end = time.perf_counter()
        if self.cuda:
            self.events[1].record()

    def launched(self) -> None:
        """Everything of the step is queued (on a CPU: done)."""
        self.end = time.perf_counter()
        if self.cuda:
            self.events[2].record()

    def seconds(self) -> tuple[float, float]:
        """(forward, sampling) seconds; on a GPU, waits for the step's end."""
        if not self.cuda:
            return self.forward_end - self.start, self.end - self.forward_end
        self.events[2].synchronize()
        return self.events[0].elapsed_time(self.events[1]) / 1e3, self.events[1].elapsed_time(self.events[2]) / 1e3
