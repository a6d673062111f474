"""Structured outputs and logit_bias through the offline API: SamplingParams(structured_outputs=...)
with n > 1, under preemption (the matchers stay with their sequences' tokens when the K/V is
recomputed) and with overlapped scheduling asked for, and through a Ray tensor-parallel group
(the masks reach the rank that samples)."""

from __future__ import annotations

import json
import threading

import jsonschema
import pytest

from llama3_dist import LLM, SamplingParams
from llama3_dist.engine import LLMEngine
from llama3_dist.sampling_params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "tag": {"type": "string", "maxLength": 5},
    },
    "required": ["id", "kind", "tag"],
    "additionalProperties": False,
}
PROMPTS = ["Describe an animal:", "Here is a record of a pet, as JSON:", "id and kind please"]


def _params() -> list[SamplingParams]:
    json_schema = StructuredOutputsParams(json=SCHEMA)
    return [
        SamplingParams(n=3, temperature=0.0, max_tokens=40, structured_outputs=json_schema),
        SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=40, structured_outputs=json_schema),
        # Unconstrained, seeded, among the top 8: over the whole 128k vocabulary of a random model the
        # distribution is nearly uniform, so the last-bit differences between a recomputed prompt's
        # K/V (GEMM) and decoded ones (GEMV) moved a seeded draw to a neighbouring token on an AVX2
        # host; a draw among 8 tokens is not that fragile and still checks the seed's continuity.
        SamplingParams(n=2, temperature=1.0, top_k=8, seed=9, max_tokens=40, ignore_eos=True),
    ]


@pytest.mark.slow
def test_constrained_outputs_survive_preemption_and_match(tokenized_checkpoint):
    with LLM(tokenized_checkpoint, dtype="float32", kv_cache_bytes=8 << 20, show_progress=False) as big:
        expected = big.generate(PROMPTS, _params(), use_tqdm=False)
    # 9 blocks of 16 tokens cannot hold the eight sequences at once: preemption recomputes them.
    with LLM(
        tokenized_checkpoint, dtype="float32", num_kv_blocks=9, async_scheduling=True, show_progress=False
    ) as small:
        got = small.generate(PROMPTS, _params(), use_tqdm=False)
        assert small.engine.stats().num_preemptions > 0
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in expected]
    for request in got[:2]:
        assert len(request.outputs) == 3
        for c in request.outputs:
            assert c.finish_reason == "stop", c.text
            jsonschema.validate(json.loads(c.text), SCHEMA)


@pytest.mark.slow  # an engine on a 128k vocabulary and llguidance's view of it: seconds
def test_bad_constraints_and_bias_are_refused_before_the_engine_holds_anything(tokenized_checkpoint, monkeypatch):
    engine = LLMEngine(tokenized_checkpoint, dtype="float32", kv_cache_bytes=4 << 20, show_progress=False)
    try:
        # The masks fill on the grammar's thread while the forward runs: a fill that fails is
        # the step's error as it is, not a rank fault that rebuilds the ranks.
        constrained = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
        engine.add_request("fill", "hello", constrained)
        compiler = engine.grammar_compiler()

        filled_on = []

        def broken(matchers, num_words):
            filled_on.append(threading.current_thread().name)
            raise RuntimeError("mask fill broke")

        monkeypatch.setattr(compiler, "fill_bitmask", broken)
        with pytest.raises(RuntimeError, match="mask fill broke"):
            engine.step()
        assert engine.stats().num_restarts == 0
        # off the engine's thread: the fill overlaps the forward pass
        assert len(filled_on) == 1 and filled_on[0].startswith("llama3-dist-grammar-fill")
        monkeypatch.undo()
        engine.abort_request("fill")
        for params, named in (
            (SamplingParams(structured_outputs=StructuredOutputsParams(regex="(ab")), "regex"),
            (SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object", "if": {}})), "if"),
            (SamplingParams(logit_bias={128256: 1.0}), "128256"),
        ):
            with pytest.raises(ValueError, match=named):
                engine.add_request("r", "hello", params)
            assert not engine.has_unfinished_requests()
        with pytest.raises(ValueError, match="exactly one"):
            StructuredOutputsParams(regex="a", choice=["b"])
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_masks_and_bias_reach_the_sampling_rank_under_tensor_parallel(tokenized_checkpoint, ray_local):
    params = [
        SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=12, structured_outputs=StructuredOutputsParams(
            choice=["alpha", "beta", "gamma"])),
        SamplingParams(temperature=0.0, max_tokens=4, logit_bias={1000: 100.0}, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=StructuredOutputsParams(json=SCHEMA)),
    ]  # fmt: skip
    with LLM(tokenized_checkpoint, dtype="float32", kv_cache_bytes=4 << 20, show_progress=False) as one:
        expected = one.generate(PROMPTS, params, use_tqdm=False)
    with LLM(
        tokenized_checkpoint, devices=["cpu", "cpu"], dtype="float32", kv_cache_bytes=4 << 20, show_progress=False
    ) as tp:
        got = tp.generate(PROMPTS, params, use_tqdm=False)
    assert all(c.text in ("alpha", "beta", "gamma") for c in got[0].outputs)
    assert got[1].outputs[0].token_ids == [1000] * 4
    jsonschema.validate(json.loads(got[2].outputs[0].text), SCHEMA)
    assert [c.token_ids for c in got[2].outputs] == [c.token_ids for c in expected[2].outputs]
