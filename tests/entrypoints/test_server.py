"""The OpenAI-compatible server, driven by the real `openai` client against uvicorn on a free local
port (one server per module, on a tiny random Llama 3 with the real tokenizer and chat template)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest
from conftest import build_tokenized_checkpoint

from llama3_dist.async_engine import AsyncLLMEngine
from llama3_dist.engine import EngineStats, LLMEngine
from llama3_dist.entrypoints.openai_server import ServerThread

MODEL = "tiny-llama3"
API_KEY = "sk-test-123"
CONTEXT = 256


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = build_tokenized_checkpoint(tmp_path_factory.mktemp("tiny-llama3"), max_position_embeddings=CONTEXT)
    engine = AsyncLLMEngine(LLMEngine(path, dtype="float32", kv_cache_bytes=8 << 20, seed=0, show_progress=False))
    with ServerThread(engine, served_model_name=MODEL) as server:
        yield server
    engine.shutdown()


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(served):
    return served.app.state.server.tokenizer


def metrics(served) -> dict[str, float]:
    """The unlabelled-by-le samples of /metrics, name -> value (histograms: _count and _sum)."""
    text = httpx.get(served.url + "/metrics").text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{([^}]*)\})? (\S+)$", line)
        if m and "le=" not in (m.group(2) or ""):
            out[m.group(1)] = float(m.group(3))
    return out


def wait_for(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


GREEDY = dict(temperature=0.0)


def test_models_and_health(served, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    r = httpx.get(served.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_completion_usage_and_prompt_forms(client, tokenizer):
    r = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, **GREEDY, extra_body={"ignore_eos": True}
    )
    ids = tokenizer.encode("The capital of France is")
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 5 and r.usage.total_tokens == len(ids) + 5
    text = r.choices[0].text
    # the same prompt as token ids gives the same completion
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, **GREEDY, extra_body={"ignore_eos": True})
    assert r2.choices[0].text == text and r2.usage.prompt_tokens == len(ids)
    # a list of strings, n=2: choices ordered prompt-major
    r3 = client.completions.create(
        model=MODEL,
        prompt=["The capital of France is", "Hi"],
        max_tokens=5,
        n=2,
        **GREEDY,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r3.choices] == [0, 1, 2, 3]
    assert r3.choices[0].text == r3.choices[1].text == text
    assert r3.usage.prompt_tokens == len(ids) + len(tokenizer.encode("Hi")) and r3.usage.completion_tokens == 20
    # a list of token-id lists
    r4 = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=3, **GREEDY)
    assert len(r4.choices) == 2 and r4.choices[0].text == text[: len(r4.choices[0].text)]
    # echo puts the prompt in front
    r5 = client.completions.create(model=MODEL, prompt="Hi there", max_tokens=3, echo=True, **GREEDY)
    assert r5.choices[0].text.startswith("Hi there")


def test_streaming_completion_matches_non_streaming(served, client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, **GREEDY, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in content) == full.choices[0].text
    assert content[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    # the raw stream is server-sent events ending in [DONE]
    with httpx.stream(
        "POST", served.base_url + "/completions", json={**kw.pop("extra_body"), **kw, "stream": True}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    # without stream_options the usage rides on the last content chunk
    last = json.loads(lines[-2][len("data: ") :])
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 12
    assert all("usage" not in json.loads(line[len("data: ") :]) for line in lines[:-2])


def test_chat(client, tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, **GREEDY)
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert (
        r.usage.completion_tokens == len(tokenizer.encode(r.choices[0].message.content, add_special_tokens=False))
        or r.choices[0].finish_reason == "length"
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        r.choices[0].finish_reason
    ]
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    # n=2 streamed: each choice opens with its role and closes with exactly one finish_reason
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=4, n=2, stream=True, temperature=1.0, seed=3
        )
    )
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant" and [c.finish_reason for c in mine if c.finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 8
    # content parts give the same prompt
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]
    assert (
        client.chat.completions.create(model=MODEL, messages=parts, max_tokens=8, **GREEDY).choices[0].message.content
        == r.choices[0].message.content
    )


def test_sampling_parameters(client):
    kw = dict(model=MODEL, prompt="Tell me a story", max_tokens=10)
    a = client.completions.create(**kw, temperature=1.0, seed=7, extra_body={"top_k": 50, "min_p": 0.01})
    b = client.completions.create(**kw, temperature=1.0, seed=7, extra_body={"top_k": 50, "min_p": 0.01})
    assert a.choices[0].text == b.choices[0].text
    # vLLM extensions: min_tokens / ignore_eos / repetition_penalty, OpenAI penalties and top_p
    r = client.completions.create(
        **{**kw, "max_tokens": 7},
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"ignore_eos": True, "min_tokens": 7, "repetition_penalty": 1.2},
    )
    assert r.usage.completion_tokens == 7
    # a stop string cuts the text (found by generating once without it)
    g = client.completions.create(**{**kw, "max_tokens": 12}, temperature=0.0, extra_body={"ignore_eos": True})
    stop = g.choices[0].text[3:6]
    assert stop.strip(), g.choices[0].text
    s = client.completions.create(**{**kw, "max_tokens": 12}, temperature=0.0, stop=[stop])
    assert s.choices[0].finish_reason == "stop" and stop not in s.choices[0].text
    assert g.choices[0].text.startswith(s.choices[0].text)


def test_logprobs(client):
    r = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=4, logprobs=3, **GREEDY, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    for _tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0 and len(top) >= 3 and abs(max(top.values()) - val) < 1e-4  # greedy: the top one
    c = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
        extra_body={"ignore_eos": True},
    )
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4 for t in content)


def test_concurrent_requests_match_requests_alone(served, client):
    prompts = [f"Request number {i} says" + " hello" * (i % 5) for i in range(12)]
    lengths = [4 + (i * 3) % 11 for i in range(12)]
    alone = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=n, **GREEDY, extra_body={"ignore_eos": True})
        .choices[0]
        .text
        for p, n in zip(prompts, lengths)
    ]

    async def together():
        async with openai.AsyncOpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=60) as ac:
            streamed = [
                ac.completions.create(
                    model=MODEL, prompt=p, max_tokens=n, stream=True, **GREEDY, extra_body={"ignore_eos": True}
                )
                for p, n in zip(prompts, lengths)
            ]

            async def text(coro):
                return "".join([c.choices[0].text async for c in await coro if c.choices])

            plain = [
                ac.completions.create(model=MODEL, prompt=p, max_tokens=n, **GREEDY, extra_body={"ignore_eos": True})
                for p, n in zip(prompts, lengths)
            ]
            return await asyncio.gather(*map(text, streamed), *plain)

    results = asyncio.run(together())
    assert results[:12] == alone
    assert [r.choices[0].text for r in results[12:]] == alone


def test_disconnect_aborts_and_frees_blocks(served):
    engine = served.engine
    wait_for(lambda: engine.stats().num_running == 0 and engine.stats().kv_blocks_used == 0, what="an idle engine")
    body = {"model": MODEL, "prompt": "Keep talking", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", served.base_url + "/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                m = metrics(served)
                assert m["llama3_dist_num_requests_running"] == 1 and m["llama3_dist_kv_cache_blocks_used"] > 0
                break  # leaving the block closes the connection mid-stream
    wait_for(
        lambda: (
            (m := metrics(served))["llama3_dist_num_requests_running"] == 0
            and m["llama3_dist_kv_cache_blocks_used"] == 0
        ),
        what="the aborted stream's blocks to be freed",
    )
    assert engine.stats().kv_blocks_used == 0
    # a non-streaming client that gives up is aborted too: the engine's steps wait until it has
    # given up, so the request cannot finish first however fast the engine is
    executor = engine.engine.executor
    client_gave_up = threading.Event()
    real_launch = executor.launch  # every engine step starts here
    executor.launch = lambda step: client_gave_up.wait(30) and real_launch(step)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(served.base_url + "/completions", json={**body, "stream": False}, timeout=0.5)
    finally:
        client_gave_up.set()
        del executor.launch
    wait_for(
        lambda: engine.stats().num_running == 0 and engine.stats().kv_blocks_used == 0,
        what="the abandoned request's blocks to be freed",
    )


def test_metrics(served, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3, **GREEDY, extra_body={"ignore_eos": True})
    text = httpx.get(served.url + "/metrics").text
    for name, kind in [
        ("num_requests_running", "gauge"),
        ("num_requests_waiting", "gauge"),
        ("generation_tokens_total", "counter"),
        ("kv_cache_blocks_used", "gauge"),
        ("time_to_first_token_seconds", "histogram"),
        ("time_per_output_token_seconds", "histogram"),
    ]:
        assert f"# TYPE llama3_dist_{name} {kind}" in text
    m = metrics(served)
    assert m["llama3_dist_generation_tokens_total"] >= 3
    assert m["llama3_dist_time_to_first_token_seconds_count"] >= 1
    assert m["llama3_dist_time_per_output_token_seconds_count"] >= 2
    assert 'llama3_dist_time_to_first_token_seconds_bucket{model_name="tiny-llama3",le="+Inf"}' in text


def test_bad_requests_get_openai_errors(served, client):
    url = served.base_url + "/completions"

    def error_of(r, status):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        return err

    error_of(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    error_of(httpx.post(url, json=["a list"]), 400)
    assert error_of(httpx.post(url, json={"model": MODEL}), 400)["param"] == "prompt"
    assert (
        error_of(httpx.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": "many"}), 400)["param"]
        == "max_tokens"
    )
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    for bad in [
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(n=0),
        dict(max_tokens=0),
        dict(logprobs=99),
        dict(extra_body={"top_k": -5}),
        dict(extra_body={"min_p": 2.0}),
        dict(presence_penalty=5.0),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="hi", **{"max_tokens": 2, **bad})
        assert e.value.status_code == 400 and e.value.body["message"], bad
    with pytest.raises(openai.BadRequestError, match="maximum context length") as e:
        client.completions.create(model=MODEL, prompt="word " * (CONTEXT + 10), max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=CONTEXT)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt=[1, 2, 10**7], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    error_of(httpx.get(served.url + "/nope"), 404)
    # ... and the server keeps serving
    assert client.completions.create(model=MODEL, prompt="still here", max_tokens=2).usage.completion_tokens >= 1
    assert served.engine.is_alive


@pytest.mark.slow  # two or three more servers, each copying the real tokenizer (~1 s)
def test_api_key(served):
    with ServerThread(served.engine, served_model_name=MODEL, api_key=API_KEY) as locked:
        for key in ["wrong", None]:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
                r = httpx.request(method, locked.url + path, headers=headers, json={"model": MODEL, "prompt": "x"})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            # probes and scrapers send no token: /health, /ping and /metrics stay open
            for path in ("/health", "/ping", "/metrics"):
                assert httpx.get(locked.url + path, headers=headers).status_code == 200, path
        with (
            openai.OpenAI(base_url=locked.base_url, api_key="wrong", max_retries=0) as bad,
            pytest.raises(openai.AuthenticationError),
        ):
            bad.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        with openai.OpenAI(base_url=locked.base_url, api_key=API_KEY, max_retries=0) as good:
            assert good.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    with ServerThread(served.engine, served_model_name=MODEL, api_key=API_KEY, protect_metrics=True) as locked:
        assert httpx.get(locked.url + "/metrics").status_code == 401
        assert httpx.get(locked.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert httpx.get(locked.url + "/health").status_code == 200


class _FailingEngine:
    """Just enough of LLMEngine to accept a request and then fail its step, as an engine that
    cannot heal would."""

    model_path = "failing"
    tokenizer = None
    recovering = None

    class config:
        max_seq_len = 64
        vocab_size = 100

    def __init__(self):
        self.requests = []

    def add_request(self, rid, prompt, params, prompt_token_ids=None):
        self.requests.append(rid)

    def has_unfinished_requests(self):
        return bool(self.requests)

    def step(self):
        raise RuntimeError("rank 1 died")

    def abort_request(self, rid):
        pass

    def stats(self):
        return EngineStats(len(self.requests), 0, 0, 0, 10, 0, 0, 0, 0)

    def check_health(self, timeout_s):
        pass

    def shutdown(self):
        pass


@pytest.mark.parametrize("stream", [False, True])
def test_health_reflects_a_dead_engine(stream):
    engine = AsyncLLMEngine(_FailingEngine())
    with ServerThread(engine) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        body = {"prompt": [1, 2, 3], "max_tokens": 2, "stream": stream}
        r = httpx.post(s.base_url + "/completions", json=body)
        if stream:  # accepted, then the step failed: an error event, then [DONE]
            assert r.status_code == 200
            events = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and "rank 1 died" in json.loads(events[-2])["error"]["message"]
        else:
            assert r.status_code == 503 and "rank 1 died" in r.json()["error"]["message"]
        h = httpx.get(s.url + "/health")
        assert h.status_code == 503 and "rank 1 died" in h.json()["error"]
        r = httpx.post(s.base_url + "/completions", json=body)  # refused at once now
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert re.search(r"llama3_dist_engine_healthy\{[^}]*\} 0", httpx.get(s.url + "/metrics").text)
    engine.shutdown()


def test_limits_each_get_a_clear_error_and_the_server_keeps_serving(served, tokenizer):
    from llama3_dist.entrypoints.openai_server import ServerLimits

    limits = ServerLimits(max_prompt_tokens=20, max_tokens=64, max_n=2, max_logprobs=3, max_body_bytes=4000)
    with (
        ServerThread(served.engine, served_model_name=MODEL, limits=limits) as limited,
        openai.OpenAI(base_url=limited.base_url, api_key="unused", max_retries=0, timeout=60) as c,
    ):
        cases = [
            (dict(prompt="word " * 40, max_tokens=2), r"the prompt has \d+ tokens; this server accepts at most 20"),
            (dict(prompt="hi", max_tokens=65), r"max_tokens is 65; this server allows at most 64 \(--max-tokens-cap\)"),
            (dict(prompt="hi", max_tokens=2, n=3), r"n is 3; this server allows at most 2 \(--max-n\)"),
            (dict(prompt="hi", max_tokens=2, logprobs=4), r"logprobs must be in \[0, 3\], got 4"),
        ]
        for kwargs, message in cases:
            with pytest.raises(openai.BadRequestError, match=message):
                c.completions.create(model=MODEL, **kwargs)
        big = httpx.post(limited.base_url + "/completions", json={"model": MODEL, "prompt": "x" * 5000}, timeout=10)
        assert big.status_code == 413 and "at most 4000 (--max-body-bytes)" in big.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError, match=r"messages.0.role: 'wizard' is not a role; use one of system"):
            c.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}], max_tokens=2)
        # a chat without max_tokens is held to the cap, and a good request still completes
        out = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], **GREEDY, extra_body={"ignore_eos": True}
        )
        assert out.usage.completion_tokens == 64
    assert served.engine.stats().kv_blocks_used == 0


@pytest.mark.slow  # two or three more servers, each copying the real tokenizer (~1 s)
def test_full_server_answers_429_and_slow_requests_time_out_with_blocks_freed(served):
    from llama3_dist.entrypoints.openai_server import ServerLimits

    long = dict(model=MODEL, prompt="Once", max_tokens=200, **GREEDY, extra_body={"ignore_eos": True})
    with (
        ServerThread(served.engine, served_model_name=MODEL, limits=ServerLimits(max_active_requests=2)) as full,
        openai.OpenAI(base_url=full.base_url, api_key="unused", max_retries=0, timeout=60) as c,
    ):
        streams = [c.completions.create(stream=True, **long) for _ in range(2)]
        for s in streams:
            next(iter(s))  # both are running
        r = httpx.post(full.base_url + "/completions", json={**long, "max_tokens": 2}, timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "its limit is 2 (--max-active-requests)" in r.json()["error"]["message"]
        for s in streams:
            s.close()  # the client leaves: both are aborted, room again
        wait_for(lambda: full.app.state.server.active_requests == 0, what="the aborted streams to be counted out")
        assert c.completions.create(**{**long, "max_tokens": 2}).usage.completion_tokens == 2
    with (
        ServerThread(served.engine, served_model_name=MODEL, limits=ServerLimits(request_timeout_s=0.2)) as slow,
        openai.OpenAI(base_url=slow.base_url, api_key="unused", max_retries=0, timeout=60) as c,
    ):
        with pytest.raises(openai.APIStatusError, match=r"longer than 0.2 s \(--request-timeout\)") as err:
            c.completions.create(**long)
        assert err.value.status_code == 408
        with pytest.raises(openai.APIError, match=r"longer than 0.2 s \(--request-timeout\)"):
            for _ in c.completions.create(stream=True, **long):  # the error event ends the stream
                pass
    wait_for(lambda: served.engine.stats().kv_blocks_used == 0, what="the timed-out requests' blocks to be freed")
