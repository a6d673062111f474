"""The serving engine end to end against transformers: continuous batching, sampling,
prefix caching, preemption, stops, and the LLM API."""

from __future__ import annotations

import itertools

import pytest
import torch

from llama3_dist import LLM, LLMEngine, SamplingParams

# The random checkpoints emit their eos id (2) now and then; token-level tests run past it.
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def mixed_prompts(n: int, vocab: int = 130, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 90, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths]


def assert_greedy_matches_transformers(ref, prompts, outputs):
    """Every generated token is the argmax of transformers' logits for its prefix (ties allowed)."""
    for prompt, out in zip(prompts, outputs):
        tokens = out.outputs[0].token_ids
        logits = ref(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        chosen = logits[torch.arange(len(tokens)), tokens]
        assert (chosen >= logits.max(-1).values - 1e-4).all(), (prompt, tokens)


@pytest.fixture(scope="module")
def llm(checkpoints):
    with LLM(checkpoints["llama"], dtype="float32", max_num_batched_tokens=256, show_progress=False) as llm:
        yield llm


def test_greedy_batch_of_24_matches_transformers(llm, references):
    prompts = mixed_prompts(24)
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert all(len(o.outputs[0].token_ids) == 12 and o.outputs[0].finish_reason == "length" for o in outputs)
    assert_greedy_matches_transformers(references("llama"), prompts, outputs)


def test_greedy_batch_of_24_at_tp2_matches_transformers(checkpoints, references, ray_local):
    """The same through two gloo ranks: sampling on rank 0, token ids back to the driver."""
    prompts = mixed_prompts(24)
    with LLM(
        checkpoints["llama"], devices=["cpu", "cpu"], dtype="float32", max_num_batched_tokens=256, show_progress=False
    ) as llm:
        outputs = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, use_tqdm=False)
    assert_greedy_matches_transformers(references("llama"), prompts, outputs)


def test_logprobs_and_prompt_logprobs_match_transformers(llm, references):
    prompts = mixed_prompts(3, seed=1)
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=6, logprobs=3, prompt_logprobs=2)
    for prompt, out in zip(prompts, llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)):
        c = out.outputs[0]
        full = prompt + c.token_ids
        logp = torch.log_softmax(references("llama")(torch.tensor([full])).logits[0], -1)
        for i, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            row = logp[len(prompt) - 1 + i]
            assert token in entry and len(entry) in (3, 4)
            assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
            assert entry[token].rank == int((row > row[token]).sum()) + 1
            top = row.topk(3).indices.tolist()
            assert [t for t, lp in entry.items() if lp.rank <= 3][:3] == top or set(top) <= set(entry)
        assert c.cumulative_logprob == pytest.approx(
            sum(e[t].logprob for e, t in zip(c.logprobs, c.token_ids)), abs=1e-4
        )
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for i, entry in enumerate(out.prompt_logprobs[1:]):
            assert entry[prompt[i + 1]].logprob == pytest.approx(logp[i, prompt[i + 1]].item(), abs=1e-4)


def test_seeded_sampling_is_reproducible_in_any_batch(llm):
    target = mixed_prompts(1, seed=2)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10)
    alone = llm.generate(prompt_token_ids=[target], sampling_params=params, use_tqdm=False)[0]
    others = mixed_prompts(7, seed=3)
    batch = llm.generate(
        prompt_token_ids=[*others[:3], target, *others[3:]],
        sampling_params=[SamplingParams(temperature=1.0, max_tokens=14)] * 3
        + [params]
        + [SamplingParams(temperature=0.5, max_tokens=5)] * 4,
        use_tqdm=False,
    )
    assert batch[3].outputs[0].token_ids == alone.outputs[0].token_ids
    greedy = llm.generate(prompt_token_ids=[target], sampling_params=GREEDY, use_tqdm=False)[0]
    top1 = llm.generate(
        prompt_token_ids=[target], sampling_params=SamplingParams(top_k=1, max_tokens=12), use_tqdm=False
    )[0]
    assert top1.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_n_completions_and_limits(llm):
    prompt = mixed_prompts(1, seed=4)[0]
    out = llm.generate(
        prompt_token_ids=[prompt],
        sampling_params=SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8),
        use_tqdm=False,
    )[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    greedy = (
        llm.generate(
            prompt_token_ids=[prompt], sampling_params=SamplingParams(temperature=0, max_tokens=20), use_tqdm=False
        )[0]
        .outputs[0]
        .token_ids
    )
    # stop_token_ids end the completion at the first such token (kept in token_ids, vLLM's way).
    stop_at = greedy[5]
    first = greedy.index(stop_at)
    out = llm.generate(
        prompt_token_ids=[prompt],
        sampling_params=SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == greedy[: first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    # min_tokens bans the stop token until then, so the greedy path changes only after it.
    out = llm.generate(
        prompt_token_ids=[prompt],
        sampling_params=SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at], min_tokens=first + 2),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(out.token_ids) >= first + 2 and stop_at not in out.token_ids[: first + 1]


def test_prefix_caching_reuses_blocks_with_identical_output(checkpoints):
    shared = torch.randint(0, 130, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    a, b = [*shared[:200], 1, 2, 3], [*shared[:200], 4, 5]
    with LLM(checkpoints["llama"], dtype="float32", show_progress=False, block_size=16) as llm:
        first = llm.generate(prompt_token_ids=[a], sampling_params=GREEDY, use_tqdm=False)[0]
        hits = llm.engine.stats().prefix_cache_hits
        second = llm.generate(prompt_token_ids=[b], sampling_params=GREEDY, use_tqdm=False)[0]
        assert llm.engine.stats().prefix_cache_hits - hits == 192  # 12 full blocks of 16
        again = llm.generate(prompt_token_ids=[a], sampling_params=GREEDY, use_tqdm=False)[0]
        assert again.outputs[0].token_ids == first.outputs[0].token_ids
    with LLM(checkpoints["llama"], dtype="float32", show_progress=False, enable_prefix_caching=False) as cold:
        assert (
            cold.generate(prompt_token_ids=[b], sampling_params=GREEDY, use_tqdm=False)[0].outputs[0].token_ids
            == second.outputs[0].token_ids
        )


def test_preemption_completes_everything_identically(checkpoints, llm):
    prompts = mixed_prompts(10, seed=6)
    params = [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.9, seed=11, max_tokens=24, ignore_eos=True),
    ] * 5
    expected = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    # 12 blocks of 16 tokens cannot hold ten sequences of up to ~110 tokens at once.
    with LLM(checkpoints["llama"], dtype="float32", show_progress=False, num_kv_blocks=12) as small:
        got = small.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        assert small.engine.stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_abort_frees_blocks_and_engine_keeps_serving(checkpoints):
    engine = LLMEngine(checkpoints["llama"], dtype="float32", show_progress=False)
    try:
        engine.add_request("a", [5, 6, 7] * 20, SamplingParams(max_tokens=100, temperature=0))
        engine.add_request("b", [8, 9], SamplingParams(max_tokens=3, temperature=0))
        engine.step()
        assert engine.stats().kv_blocks_used > 0
        engine.abort_request("a")
        finished = []
        while engine.has_unfinished_requests():
            finished += [o for o in engine.step() if o.finished]
        assert [o.request_id for o in finished] == ["b"] and len(finished[0].outputs[0].token_ids) == 3
        assert engine.stats().kv_blocks_used == 0
    finally:
        engine.shutdown()


def test_invalid_requests_are_refused_before_entering(llm):
    for bad, match in (
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_k=-5), "top_k"),
        (dict(bogus=1), "bogus"),
    ):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="token id 999 is outside the vocabulary"):
        llm.generate(prompt_token_ids=[[1, 2], [999]], sampling_params=GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="the prompt has 512 tokens; the context is 512"):
        llm.generate(prompt_token_ids=[[1] * 512], sampling_params=GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("text needs a tokenizer", GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # the good request of the refused batch was withdrawn
    assert llm.generate(prompt_token_ids=[[1, 2]], sampling_params=GREEDY, use_tqdm=False)[0].finished


def test_text_stop_strings_chat_and_streaming(tokenized_checkpoint):
    with LLM(tokenized_checkpoint, dtype="float32", show_progress=False) as llm:
        tok = llm.get_tokenizer()
        base = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
        assert base.prompt_token_ids == tok.encode("The capital of France is")
        text, ids = base.outputs[0].text, base.outputs[0].token_ids
        assert text == tok.decode(ids, skip_special_tokens=True)
        # A stop string that spans a token boundary: the text ends right before it.
        boundary = len(tok.decode(ids[:5], skip_special_tokens=True))
        stop = text[boundary - 2 : boundary + 2]
        assert len(stop) == 4 and text.find(stop) == boundary - 2
        cut = llm.generate(
            "The capital of France is", SamplingParams(temperature=0, max_tokens=16, stop=[stop]), use_tqdm=False
        )[0].outputs[0]
        assert cut.text == text[: boundary - 2] and cut.finish_reason == "stop" and cut.stop_reason == stop
        kept = llm.generate(
            "The capital of France is",
            SamplingParams(temperature=0, max_tokens=16, stop=[stop], include_stop_str_in_output=True),
            use_tqdm=False,
        )[0].outputs[0]
        assert kept.text == text[: boundary + 2]
        # Before min_tokens stop strings do not count (vLLM): the one ending in token 5 is passed.
        late = llm.generate(
            "The capital of France is",
            SamplingParams(temperature=0, max_tokens=16, stop=[stop], min_tokens=8),
            use_tqdm=False,
        )[0].outputs[0]
        assert late.text.startswith(text[: boundary + 2]) and len(late.token_ids) >= 8
        # ignore_eos: generation runs to max_tokens even past the eos token.
        eos_params = SamplingParams(temperature=0, max_tokens=6, stop_token_ids=[ids[2]], ignore_eos=True)
        assert len(llm.generate("The capital of France is", eos_params, use_tqdm=False)[0].outputs[0].token_ids) == 3
        chat = llm.chat(
            [{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False
        )[0]
        assert (
            chat.prompt_token_ids
            == tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)[
                "input_ids"
            ]
        )
        chunks = list(llm.generate_stream("The capital of France is", SamplingParams(temperature=0, max_tokens=16)))
        assert len(chunks) == 16 and chunks[-1].finished and not chunks[0].finished
        assert chunks[-1].outputs[0].text == text
        assert all(b.outputs[0].text.startswith(a.outputs[0].text) for a, b in itertools.pairwise(chunks))


@pytest.mark.subprocess
def test_cli_generate_runs_on_the_embedded_default():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "llama3_dist", "generate", "--prompt", "Hello", "--max-tokens", "6", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello") and len(result.stdout) > len("Hello")
    assert "[6 tokens in" in result.stderr and "finish: length" in result.stderr
