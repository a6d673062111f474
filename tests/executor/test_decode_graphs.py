"""Decode graphs' bucketing, padding and static buffers, on the CPU: off CUDA, DecodeGraphs runs
the padded batch eagerly on the same buffers the captured graphs read, so everything but the
capture itself is checked here (benchmarks/gpu_check.py checks graphs against eager on a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama3_dist import Llama3Model, TextContext
from llama3_dist.executor.decode_graphs import DecodeGraphs, capture_sizes


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(256)[-3:] == [240, 248, 256] and len(capture_sizes(256)) == 35
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        capture_sizes(0)


def load(path):
    return Llama3Model.from_pretrained(path, devices=["cpu"], dtype="float32", block_size=4, num_kv_blocks=96)


def with_graphs(model: Llama3Model, sizes: list[int]) -> DecodeGraphs:
    worker = model.executor.worker
    graphs = DecodeGraphs(
        worker.model, worker.kv_caches, worker.cos_sin, sizes, max_blocks_per_sequence=32, device=worker.device
    )
    worker.decode_graphs = graphs  # the worker now serves decode steps through it
    return graphs


def test_padded_buckets_give_the_eager_outputs(checkpoints):
    """Batches of 5, 8, 3 and 1 sequences through buckets of 4 and 8 (padding, a smaller batch
    after a larger one in the same buffers, a batch past the largest bucket) decode exactly as
    the eager path, step after step: padding rows write no K/V and their logits are dropped."""
    prompts = [list(range(3, 3 + n)) for n in (5, 11, 2, 7, 9, 4, 6, 13, 3)]
    eager, graphed = load(checkpoints["llama"]), load(checkpoints["llama"])
    graphs = with_graphs(graphed, [1, 4, 8])
    served = []
    real_run = graphs.run
    graphs.run = lambda step, tokens=None: served.append(len(step.tokens)) or real_run(step, tokens)
    try:
        states = []
        for model in (eager, graphed):
            contexts = [TextContext(tokens=list(p)) for p in prompts]
            inputs = model.prepare_initial_token_inputs(contexts)
            states.append([contexts, inputs, model.execute(inputs).next_token_logits])
        assert torch.equal(states[0][2], states[1][2])
        # batches: all 9 (past the largest bucket: eager), then 5, 8, 3, 1 of them
        for batch in (9, 5, 8, 3, 1, 8, 5):
            for state, model in zip(states, (eager, graphed)):
                contexts, _, logits = state
                tokens = logits[:batch].argmax(-1).tolist()
                for context, token in zip(contexts[:batch], tokens):
                    context.tokens.append(token)
                inputs = model.prepare_initial_token_inputs(contexts[:batch])
                state[2] = torch.cat([model.execute(inputs).next_token_logits, logits[batch:]])
            assert torch.equal(states[0][2], states[1][2]), f"batch {batch}"
        assert served == [5, 8, 3, 1, 8, 5]  # every batch that fits a bucket, none past it
        # every padded step reset the rows past its batch: no stray slot or context
        assert torch.equal(graphs.slot_mapping[5:8], torch.full((3,), -1))
        assert torch.equal(graphs.context_lens[5:8], torch.ones(3, dtype=torch.int32))
    finally:
        eager.close()
        graphed.close()


def test_serves_only_plain_decode_steps(checkpoints):
    model = load(checkpoints["llama"])
    try:
        graphs = with_graphs(model, [1, 2])
        contexts = [TextContext(tokens=[5, 6, 7]), TextContext(tokens=[8])]
        prefill = model.prepare_initial_token_inputs(contexts)
        assert not graphs.serves(prefill.kv_cache_inputs)  # 4 tokens for 2 sequences
        model.execute(prefill)
        decode = model.prepare_next_token_inputs([1, 2], prefill).kv_cache_inputs
        assert graphs.serves(decode)
        decode.hidden_rows = np.arange(2)
        assert not graphs.serves(decode)  # hidden states come from the eager path
        with pytest.raises(ValueError, match="not served by the buckets"):
            graphs.run(decode)
    finally:
        model.close()
