"""build_step_input: the decode path (one token per context, from Python lists) builds the same
arrays as the general one."""

import random

import numpy as np

from llama3_dist.core.step_input import build_step_input
from llama3_dist.core.text_context import TextContext


def test_decode_steps_equal_the_general_path():
    rng = random.Random(0)
    block_size = 16
    for batch in (1, 2, 7, 64):
        contexts = []
        for _ in range(batch):
            length = rng.randint(1, 200)
            blocks = rng.sample(range(500), -(-length // block_size) + rng.randint(0, 2))  # spare blocks too
            tokens = [rng.randrange(1000) for _ in range(length)]
            contexts.append(TextContext(tokens=tokens, block_ids=blocks, num_computed_tokens=length - 1))
        decode = build_step_input(contexts, [1] * batch, block_size)
        # Given logit_rows, the general path builds it (the decode path leaves them out).
        general = build_step_input(contexts, [1] * batch, block_size, logit_rows=np.arange(batch, dtype=np.int64))
        names = ("tokens", "positions", "query_start_loc", "context_lens", "block_tables", "slot_mapping", "logit_rows")
        for name in names:
            got, want = getattr(decode, name), getattr(general, name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            np.testing.assert_array_equal(got, want, err_msg=name)
        # Counts that sum to the batch without being one each take the general path.
        if batch == 2:
            contexts[1].num_computed_tokens -= 1
            mixed = build_step_input(contexts, [0, 2], block_size)
            assert mixed.query_start_loc.tolist() == [0, 0, 2] and len(mixed.tokens) == 2
            contexts[1].num_computed_tokens += 1
        c = contexts[-1]
        p = c.num_computed_tokens
        assert decode.tokens[-1] == c.tokens[p]
        assert decode.slot_mapping[-1] == c.block_ids[p // block_size] * block_size + p % block_size
