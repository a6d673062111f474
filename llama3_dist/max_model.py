"""MAX-style model API: Llama3Model, Llama3Inputs, ModelOutputs.

The driver owns the TextContexts and the KV block pool; the executor owns the workers. A call
sequence is prepare_initial_token_inputs -> execute -> prepare_next_token_inputs -> execute ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import Llama3Config, ReturnHiddenStates, ReturnLogits
from .core.block_manager import BlockPool
from .core.step_input import StepInput, build_step_input
from .core.text_context import TextContext, check_tokens
from .executor import Executor, make_executor
from .model.checkpoint import open_checkpoint
from .model.sampler import compute_logprobs


@dataclass(slots=True)
class Llama3Inputs:
    tokens: torch.Tensor  # [N] int64, every sequence's new tokens back to back
    input_row_offsets: torch.Tensor  # [B+1] int32
    return_n_logits: torch.Tensor  # scalar int64
    kv_cache_inputs: StepInput
    contexts: list[TextContext]
    logit_offsets: torch.Tensor | None = None  # [B+1] rows of `logits` per sequence (ALL/VARIABLE)


@dataclass(slots=True)
class ModelOutputs:
    next_token_logits: torch.Tensor  # [B, V] float32
    logits: torch.Tensor | None = None  # [M, V] float32 (ALL / VARIABLE)
    logit_offsets: torch.Tensor | None = None  # [B+1]
    hidden_states: torch.Tensor | None = None


@dataclass(slots=True)
class LogProbabilities:
    """Per sequence: the log-probability of each scored token and the top-n alternatives."""

    token_log_probabilities: list[float]
    top_log_probabilities: list[dict[int, float]]


class Llama3Model:
    def __init__(self, config: Llama3Config, executor: Executor):
        self.config = config
        self.executor = executor
        self._closed = False
        self.pool = BlockPool(executor.num_kv_blocks, config.kv_params.block_size)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        devices: list[str] | None = None,
        dtype: str | None = None,
        max_seq_len: int | None = None,
        return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN,
        return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        executor: str = "auto",
        enforce_eager: bool = False,
        max_batch_size: int = 64,
        load_format: str = "auto",
        quantization: str | None = None,
        **executor_kwargs,
    ) -> Llama3Model:
        """Loads a Hugging Face checkpoint directory onto `devices` (one tensor-parallel rank each).

        executor: "local" (in-process, one device), "ray" (one actor per device) or "auto"
        (local for one device, Ray for more). On CUDA, decode steps of up to max_batch_size
        sequences replay captured CUDA graphs unless enforce_eager. load_format "dummy": random
        weights of the config's shapes (benchmarks; the directory needs only config.json).
        quantization: as LLMEngine's ("int8", "int4", "int4-g128" or None).
        """
        config = Llama3Config.from_pretrained(
            path,
            dtype=dtype,
            max_seq_len=max_seq_len,
            devices=devices,
            return_logits=ReturnLogits(return_logits),
            return_hidden_states=ReturnHiddenStates(return_hidden_states),
            block_size=block_size,
            quantization=quantization,
        )
        if load_format != "dummy":
            open_checkpoint(path).close()  # fail on a missing or pickle-only checkpoint before any worker starts
        worker_kwargs = dict(
            num_kv_blocks=num_kv_blocks,
            kv_cache_bytes=kv_cache_bytes,
            enforce_eager=enforce_eager,
            max_num_seqs=max_batch_size,
            load_format=load_format,
        )
        return cls(config, make_executor(config, str(path), executor, worker_kwargs, **executor_kwargs))

    # --- inputs ---------------------------------------------------------------------------
    def _validate(self, ctx: TextContext) -> None:
        c = self.config
        # Only the new tokens need an id check: the computed ones passed it before.
        check_tokens(f"context {ctx.request_id}", ctx.tokens, c.vocab_size, start=ctx.num_computed_tokens)
        if len(ctx.tokens) > c.max_seq_len:
            raise ValueError(f"context {ctx.request_id}: {len(ctx.tokens)} tokens exceed max_seq_len {c.max_seq_len}")

    def _reserve_blocks(self, ctx: TextContext) -> None:
        needed = self.pool.blocks_needed(len(ctx.tokens)) - len(ctx.block_ids)
        if needed > 0:
            ctx.block_ids.extend(self.pool.allocate(needed))

    def _make_inputs(self, ctxs: list[TextContext], return_n_logits: int) -> Llama3Inputs:
        num_new = [len(c.tokens) - c.num_computed_tokens for c in ctxs]
        offsets = np.concatenate(([0], np.cumsum(num_new)))
        mode = self.config.return_logits
        if mode == ReturnLogits.LAST_TOKEN:
            rows, logit_offsets = offsets[1:] - 1, None
        else:
            counts = num_new if mode == ReturnLogits.ALL else [min(return_n_logits, n) for n in num_new]
            rows = np.concatenate([np.arange(e - k, e) for e, k in zip(offsets[1:], counts)])
            logit_offsets = torch.from_numpy(np.concatenate(([0], np.cumsum(counts))))
        step = build_step_input(ctxs, num_new, self.config.kv_params.block_size, rows.astype(np.int64))
        hidden = self.config.return_hidden_states
        if hidden != ReturnHiddenStates.NONE:
            step.hidden_rows = (
                offsets[1:] - 1 if hidden == ReturnHiddenStates.LAST else np.arange(offsets[-1])
            ).astype(np.int64)
            step.normalized_hidden = hidden == ReturnHiddenStates.ALL_NORMALIZED
        return Llama3Inputs(
            tokens=torch.from_numpy(step.tokens),
            input_row_offsets=torch.from_numpy(step.query_start_loc),
            return_n_logits=torch.tensor(return_n_logits),
            kv_cache_inputs=step,
            contexts=list(ctxs),
            logit_offsets=logit_offsets,
        )

    def prepare_initial_token_inputs(
        self, replica_batches: list[TextContext], kv_cache_inputs=None, return_n_logits: int = 1
    ) -> Llama3Inputs:
        """Claims KV blocks for each context's uncomputed tokens and batches them ragged."""
        ctxs = replica_batches
        if not ctxs:
            raise ValueError("prepare_initial_token_inputs needs at least one TextContext")
        if return_n_logits < 1:
            raise ValueError(f"return_n_logits must be >= 1, got {return_n_logits}")
        for ctx in ctxs:
            self._validate(ctx)
            if ctx.num_computed_tokens >= len(ctx.tokens):
                raise ValueError(f"context {ctx.request_id} has no new tokens to compute")
        for ctx in ctxs:
            self._reserve_blocks(ctx)
        return self._make_inputs(ctxs, return_n_logits)

    def prepare_next_token_inputs(self, next_tokens, prev_model_inputs: Llama3Inputs) -> Llama3Inputs:
        """Appends next_tokens[i] to the i-th context of the previous inputs; one new token each."""
        ctxs = prev_model_inputs.contexts
        next_tokens = [int(t) for t in torch.as_tensor(next_tokens).reshape(-1).tolist()]
        if len(next_tokens) != len(ctxs):
            raise ValueError(f"{len(next_tokens)} next tokens for a batch of {len(ctxs)} contexts")
        for ctx in ctxs:
            if ctx.num_computed_tokens != len(ctx.tokens):
                raise ValueError(f"context {ctx.request_id} has unexecuted tokens: execute the previous inputs first")
        for ctx, token in zip(ctxs, next_tokens):
            ctx.tokens.append(token)
            try:
                self._validate(ctx)
            except ValueError:
                ctx.tokens.pop()
                raise
        for ctx in ctxs:
            self._reserve_blocks(ctx)
        return self._make_inputs(ctxs, int(prev_model_inputs.return_n_logits))

    # --- execution ------------------------------------------------------------------------
    def execute(self, model_inputs: Llama3Inputs) -> ModelOutputs:
        step = model_inputs.kv_cache_inputs
        out = self.executor.execute(step)
        offsets = step.query_start_loc
        for ctx, n in zip(model_inputs.contexts, np.diff(offsets)):
            ctx.num_computed_tokens += int(n)
        logits = out.logits
        assert logits is not None, "the model API's steps do not sample, so rank 0 returns logits"
        if self.config.return_logits == ReturnLogits.LAST_TOKEN:
            return ModelOutputs(next_token_logits=logits, hidden_states=out.hidden_states)
        assert model_inputs.logit_offsets is not None  # set for ALL and VARIABLE
        last = model_inputs.logit_offsets[1:] - 1
        return ModelOutputs(
            next_token_logits=logits[last],
            logits=logits,
            logit_offsets=model_inputs.logit_offsets,
            hidden_states=out.hidden_states,
        )

    def compute_log_probabilities(
        self,
        model_inputs: Llama3Inputs,
        model_outputs: ModelOutputs,
        next_tokens,
        batch_top_n: list[int],
        batch_echo: list[bool],
    ) -> list[LogProbabilities | None]:
        """Log-probabilities of each sequence's sampled token (and, with echo, of every input token
        that has a logits row before it), with the top-n alternatives. None where top_n is 0 and
        echo is off."""
        next_tokens = torch.as_tensor(next_tokens).reshape(-1).tolist()
        tokens = model_inputs.tokens.tolist()
        in_offsets = model_inputs.input_row_offsets.tolist()
        results: list[LogProbabilities | None] = []
        for b, (top_n, echo) in enumerate(zip(batch_top_n, batch_echo)):
            if not top_n and not echo:
                results.append(None)
                continue
            if echo:
                if model_outputs.logits is None or model_outputs.logit_offsets is None:
                    raise ValueError("echo needs the model built with return_logits ALL or VARIABLE")
                lo, hi = int(model_outputs.logit_offsets[b]), int(model_outputs.logit_offsets[b + 1])
                rows = model_outputs.logits[lo:hi]
                # Row i scores the token after it: the next input token, and for the last row the sampled one.
                seq = tokens[in_offsets[b] : in_offsets[b + 1]]
                targets = [*seq[len(seq) - (hi - lo) + 1 :], next_tokens[b]]
            else:
                rows = model_outputs.next_token_logits[b : b + 1]
                targets = [next_tokens[b]]
            results.append(log_probabilities(rows, targets, top_n))
        return results

    # --- lifetime -------------------------------------------------------------------------
    def release(self, context: TextContext) -> None:
        """Frees the context's KV blocks; it can be prepared again from scratch."""
        self.pool.free(context.block_ids)
        context.block_ids = []
        context.num_computed_tokens = 0

    def close(self) -> None:
        """Closes the executor (its workers and their memory); safe to call twice."""
        if not self._closed:
            self._closed = True
            self.executor.close()

    def __enter__(self) -> Llama3Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def log_probabilities(logits: torch.Tensor, targets: list[int], top_n: int) -> LogProbabilities:
    """Log-softmax of each row: the target's value and the top_n entries."""
    rows = compute_logprobs(logits, targets, top_n)
    return LogProbabilities(
        [r.logprobs[0] for r in rows], [dict(zip(r.token_ids[1:], r.logprobs[1:])) for r in rows] if top_n else []
    )
