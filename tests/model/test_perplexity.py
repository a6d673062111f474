"""benchmarks/perplexity.py: our strided-window perplexity (prompt_logprobs of LLM.generate)
equals transformers' through the same windowing, and both equal a direct computation that scores
each token with a forward pass over exactly the context its window gives it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from llama3_dist import LLM

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from perplexity import perplexity, transformers_scorer, windows


def test_windows_score_every_token_once():
    assert windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert windows(3, 8, 4) == [(0, 3, 2)]
    assert windows(8, 4, 4) == [(0, 4, 3), (4, 8, 3)]  # disjoint windows: each first token has no context
    with pytest.raises(ValueError, match="stride"):
        windows(10, 4, 5)


def direct_perplexity(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Token i is scored by the window that ends first past it, with the context from that
    window's start; no windowing code shared. Tokens with the same context start share one
    forward pass (causal attention: a position's logits see only the tokens before it)."""
    by_begin: dict[int, list[int]] = {}
    for i in range(1, len(ids)):
        begin = next(b for b in range(0, len(ids), stride) if min(b + window, len(ids)) > i)
        if begin < i:  # begin == i: the window starts at the token, no context (stride == window)
            by_begin.setdefault(begin, []).append(i)
    nll, count = 0.0, 0
    for begin, targets in by_begin.items():
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(torch.tensor([ids[begin : targets[-1]]])).logits[0].double(), dim=-1)
        for i in targets:
            nll -= logprobs[i - 1 - begin, ids[i]].item()  # the logits at position i - 1 predict ids[i]
            count += 1
    return math.exp(nll / count), count


def test_ours_equals_transformers_and_a_direct_computation(checkpoints, references):
    ids = torch.randint(0, 130, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    reference = references("llama")  # float32, eager attention
    with LLM(checkpoints["llama"], dtype="float32", show_progress=False, kv_cache_bytes=8 << 20) as llm:
        for window, stride in [(24, 10), (20, 20)]:
            ours, n_ours = perplexity(llm, ids, window, stride)
            theirs, n_theirs = perplexity(transformers_scorer(reference), ids, window, stride)
            direct, n_direct = direct_perplexity(reference, ids, window, stride)
            assert n_ours == n_theirs == n_direct
            assert ours == pytest.approx(direct, rel=1e-4)
            assert theirs == pytest.approx(direct, rel=1e-5)
    assert n_direct == 59 - 2  # (20, 20): 3 windows, whose first tokens are not scored
