"""Bad input never hurts anyone else (issue 14): property-based fuzzing of the HTTP API. Random
JSON shapes and types, huge and negative numbers, unicode, invalid UTF-8, token ids out of range,
stop lists of thousands, empty messages: every answer is 200 or a 4xx with an OpenAI error body,
never a 5xx; afterwards a normal request gives the same greedy output as before and every KV
block is back in the pool."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import build_tokenized_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama3_dist.async_engine import AsyncLLMEngine
from llama3_dist.engine import LLMEngine
from llama3_dist.entrypoints.openai_server import ServerLimits, ServerThread

pytestmark = [pytest.mark.slow]

MODEL = "tiny"
NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-3, 3),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=20))
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
TOKEN_IDS = st.lists(st.integers(-5, 300_000), max_size=12)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "wizard", ""]) | ANY_JSON},
        optional={"content": st.text(max_size=40) | ANY_JSON, "name": SCALARS},
    )
    | ANY_JSON,
    max_size=4,
)
FIELDS = {
    "model": st.just(MODEL) | SCALARS,
    "prompt": st.text(max_size=60) | TOKEN_IDS | st.lists(st.text(max_size=10), max_size=3) | ANY_JSON,
    "messages": MESSAGES,
    "max_tokens": NUMBERS | SCALARS,
    "max_completion_tokens": NUMBERS,
    "temperature": NUMBERS | SCALARS,
    "top_p": NUMBERS,
    "top_k": NUMBERS,
    "min_p": NUMBERS,
    "n": NUMBERS,
    "seed": NUMBERS,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=3), max_size=3000) | ANY_JSON,
    "stop_token_ids": TOKEN_IDS | ANY_JSON,
    "stream": st.booleans() | SCALARS,
    "stream_options": ANY_JSON,
    "logprobs": NUMBERS | st.booleans(),
    "top_logprobs": NUMBERS,
    "echo": st.booleans(),
    "presence_penalty": NUMBERS,
    "frequency_penalty": NUMBERS,
    "repetition_penalty": NUMBERS,
    "min_tokens": NUMBERS,
    "ignore_eos": st.booleans() | SCALARS,
    "logit_bias": ANY_JSON,
    "response_format": ANY_JSON,
    "tools": ANY_JSON,
    "best_of": NUMBERS,
    "suffix": SCALARS,
}
# A valid request with up to three fields replaced (most examples reach the engine), or a body of
# random fields (shapes the validators must refuse).
VALID = {
    "/completions": {"model": MODEL, "prompt": "Hello", "max_tokens": 4},
    "/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
}
MUTATIONS = st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True).flatmap(
    lambda keys: st.fixed_dictionaries({key: FIELDS[key] for key in keys})
)
REQUESTS = st.one_of(
    st.tuples(st.sampled_from(sorted(VALID)), MUTATIONS).map(lambda pm: (pm[0], {**VALID[pm[0]], **pm[1]})),
    st.tuples(st.sampled_from(sorted(VALID)), st.fixed_dictionaries({}, optional=FIELDS)),
)
RAW = st.one_of(
    st.binary(max_size=64),  # invalid UTF-8, truncated JSON, anything
    ANY_JSON.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"{", b"[]", b"null", b'{"model": "tiny", "prompt": "\xff\xfe"}', b"\xef\xbb\xbf{}"]),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = build_tokenized_checkpoint(tmp_path_factory.mktemp("fuzz"), max_position_embeddings=128)
    engine = AsyncLLMEngine(LLMEngine(path, dtype="float32", kv_cache_bytes=4 << 20, show_progress=False))
    limits = ServerLimits(max_tokens=6, max_n=2, max_prompt_tokens=64, request_timeout_s=30)
    with ServerThread(engine, served_model_name=MODEL, limits=limits) as s:
        yield s
    engine.shutdown()


def greedy(server) -> list[str]:
    body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    return httpx.post(server.base_url + "/completions", json=body, timeout=60).json()["choices"][0]["text"]


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and "type" in error, response.text
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
        for line in response.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                assert "server_error" not in line, line


@pytest.fixture(scope="module")
def before(server):
    return greedy(server)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
@given(request=REQUESTS)
def test_random_json_bodies_get_200_or_an_openai_4xx(server, before, request):
    path, body = request
    try:
        data = json.dumps(body)
    except (TypeError, ValueError):
        return
    check(httpx.post(server.base_url + path, content=data, headers={"content-type": "application/json"}, timeout=60))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
@given(path=st.sampled_from(["/completions", "/chat/completions", "/models"]), raw=RAW)
def test_raw_bytes_get_200_or_an_openai_4xx(server, before, path, raw):
    check(httpx.post(server.base_url + path, content=raw, timeout=60))


def test_afterwards_the_same_greedy_output_and_every_block_free(server, before):
    assert greedy(server) == before
    deadline = time.monotonic() + 20
    while server.engine.stats().kv_blocks_used or server.app.state.server.active_requests:
        assert time.monotonic() < deadline, server.engine.stats()
        time.sleep(0.05)
