"""Structured outputs, tool calling and the rest of the OpenAI surface (logit_bias, echo with
logprobs, /tokenize, /detokenize), driven by the real `openai` client against one in-process
server on a tiny random Llama 3 with the real tokenizer and a Llama 3.1-style chat template that
renders tools. A random model writes garbage, so every output here parses only because the
grammar forced it."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from conftest import build_tokenized_checkpoint

from llama3_dist.async_engine import AsyncLLMEngine
from llama3_dist.engine import LLMEngine
from llama3_dist.entrypoints.openai_server import ServerLimits, ServerThread
from llama3_dist.sampling_params import MAX_GRAMMAR_BYTES

# Every test here shares one server whose start (a 128k-vocabulary model, llguidance's view of
# the vocabulary) takes seconds: the whole module stays out of the fast lane.
pytestmark = pytest.mark.slow

MODEL = "tiny-llama3"
CONTEXT = 1024

# Llama 3.1's tool-calling chat template, cut to what these tests use (tools in the first user
# message, assistant calls as {"name", "parameters"} JSON, tool results in ipython turns).
LLAMA31_TOOLS_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- if tools is not none and messages | length > 0 %}"
    "{%- set first_user_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}"
    "{{- 'Given the following functions, please respond with a JSON for a function call with its proper "
    "arguments that best answers the given prompt.\\n\\n' }}"
    '{{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
    "value}. Do not use variables.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first_user_message + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] in ['ipython', 'tool'] %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- for tool_call in message.tool_calls %}{%- set f = tool_call.function %}"
    "{{- '{\"name\": \"' + f.name + '\", \"parameters\": ' + (f.arguments | tojson) + '}' }}"
    "{%- if not loop.last %}{{- '; ' }}{%- endif %}{%- endfor %}{{- '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,5}-[0-9]{2}"
CHOICES = ["yes", "no", "maybe"]
GRAMMAR = 'root ::= "(" [0-9]{1,3} (" + " [0-9]{1,3}){0,3} ")"'
GRAMMAR_RE = re.compile(r"\([0-9]{1,3}( \+ [0-9]{1,3}){0,3}\)")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Rome", "Oslo"]},
                    "days": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a time zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = build_tokenized_checkpoint(tmp_path_factory.mktemp("tiny-llama3-tools"), max_position_embeddings=CONTEXT)
    config_file = Path(path) / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = LLAMA31_TOOLS_TEMPLATE
    config_file.write_text(json.dumps(config))
    engine = AsyncLLMEngine(LLMEngine(path, dtype="float32", kv_cache_bytes=16 << 20, seed=0, show_progress=False))
    with ServerThread(engine, served_model_name=MODEL, limits=ServerLimits(max_n=20)) as server:
        yield server
    engine.shutdown()


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(served):
    return served.app.state.server.tokenizer


def _biases(tokenizer) -> dict[str, float]:
    """Pushes a random model to close strings and objects soon, so that any-JSON outputs end well
    inside max_tokens (the grammar still decides what is valid)."""
    ids = {tokenizer.encode(s, add_special_tokens=False)[0] for s in ('"', "}", '"}')}
    return {str(i): 25.0 for i in ids}


def _split_bias(extra: dict) -> tuple[dict | None, dict]:
    """(logit_bias, the other fields): the openai client takes logit_bias as an argument of its own."""
    fields = dict(extra)
    return fields.pop("logit_bias", None), fields


def _constraints(tokenizer) -> dict[str, tuple[dict, object]]:
    """kind -> (extra_body fields, check(text) raising on a bad output)."""

    def check_json(text):
        jsonschema.validate(json.loads(text), PERSON)

    def check_object(text):
        assert isinstance(json.loads(text), dict)

    def check_regex(text):
        assert re.fullmatch(REGEX, text), text

    def check_choice(text):
        assert text in CHOICES, text

    def check_grammar(text):
        assert GRAMMAR_RE.fullmatch(text), text

    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    return {
        "json": ({"response_format": schema_format}, check_json),
        "json_object": ({"response_format": {"type": "json_object"}, "logit_bias": _biases(tokenizer)}, check_object),
        "regex": ({"guided_regex": REGEX}, check_regex),
        "choice": ({"structured_outputs": {"choice": CHOICES}}, check_choice),
        "grammar": ({"guided_grammar": GRAMMAR}, check_grammar),
    }


def test_every_constraint_kind_parses_over_20_samples(client, tokenizer):
    """20 sampled completions (temperature 1) per kind, all valid; each request also asks n=20,
    so every sequence has a matcher of its own."""
    for kind, (extra, check) in _constraints(tokenizer).items():
        bias, fields = _split_bias(extra)
        r = client.completions.create(
            model=MODEL,
            prompt="Describe a person:",
            n=20,
            max_tokens=48,
            temperature=1.0,
            seed=7,
            logit_bias=bias,
            extra_body=fields,
        )
        assert len(r.choices) == 20
        for c in r.choices:
            assert c.finish_reason == "stop", (kind, c.text)
            check(c.text)


def test_constrained_rows_leave_unconstrained_ones_unchanged(client, tokenizer):
    """Seeded unconstrained requests give the same tokens alone and batched with constrained
    chat requests (n=3, every kind) whose outputs all parse."""
    plain = [dict(prompt=f"Story {i}:", seed=100 + i, max_tokens=12, temperature=1.0) for i in range(3)]

    def run_plain(kw):
        r = client.completions.create(model=MODEL, extra_body={"ignore_eos": True}, **kw)
        return r.choices[0].text

    alone = [run_plain(kw) for kw in plain]
    constraints = _constraints(tokenizer)

    def run_constrained(kind):
        extra, check = constraints[kind]
        bias, fields = _split_bias(extra)
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Give me {kind}"}],
            n=3,
            max_tokens=48,
            temperature=1.0,
            seed=3,
            logit_bias=bias,
            extra_body=fields,
        )
        for c in r.choices:
            assert c.finish_reason == "stop", (kind, c.message.content)
            check(c.message.content)
        return kind

    with ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(run_constrained, kind) for kind in constraints]
        mixed = [pool.submit(run_plain, kw) for kw in plain]
        assert [f.result() for f in constrained] == list(constraints)
        assert [f.result() for f in mixed] == alone


def test_a_grammar_the_model_cannot_finish_ends_with_length(client):
    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=5, temperature=1.0, seed=1, extra_body={"guided_regex": "[a-z]{400}"}
    )
    c = r.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 5
    assert re.fullmatch("[a-z]+", c.text), c.text


def test_bad_constraints_are_400_naming_the_problem(client, served):
    cases = [
        ({"guided_regex": "[a-"}, "regex"),
        ({"guided_json": {"type": "strin"}}, "strin"),
        ({"guided_json": {"type": "object", "not": {"required": ["a"]}}}, "not"),
        ({"guided_grammar": "root ::= missing_rule"}, "missing_rule"),
        ({"guided_json": "{not json"}, "not valid JSON"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
        ({"response_format": {"type": "yaml"}}, "yaml"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "one constraint"),
        ({"structured_outputs": {"choice": []}}, "choice"),
        ({"structured_outputs": {"jsonn": {}}}, "jsonn"),
        ({"guided_json": {"type": "object", "description": "x" * (MAX_GRAMMAR_BYTES + 1)}}, str(MAX_GRAMMAR_BYTES)),
    ]
    for extra, named in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body=extra)
        assert named in e.value.message, (extra, e.value.message)
    with pytest.raises(openai.BadRequestError, match="schema"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integr"}}},
        )
    # and the server keeps serving
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].finish_reason
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_logit_bias(client, tokenizer):
    prompt = "The weather today is"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0.0, logprobs=0)
    greedy_token = base.choices[0].logprobs.tokens[0]
    greedy_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(greedy_token))[0]
    forced_id = 1000 if greedy_id != 1000 else 1001
    forced = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=3,
        temperature=0.0,
        logit_bias={str(forced_id): 100},
        extra_body={"ignore_eos": True},
    )
    assert forced.choices[0].text == tokenizer.decode([forced_id] * 3)
    banned = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0.0, logit_bias={str(greedy_id): -100}, logprobs=0
    )
    assert banned.choices[0].logprobs.tokens[0] != greedy_token
    for bias, named in (({"200000": 1}, "200000"), ({"5": 101}, "101"), ({"x": 1}, "'x'")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, logit_bias=bias)
        assert "logit_bias" in e.value.message and named in e.value.message


def test_tokenize_detokenize_echo_and_accepted_fields(client, served, tokenizer):
    r = httpx.post(served.url + "/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert r["tokens"] == tokenizer.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == CONTEXT
    chat = httpx.post(served.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert tokenizer.decode(chat["tokens"]).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    back = httpx.post(served.url + "/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert back == {"prompt": tokenizer.decode(r["tokens"])}
    bad = httpx.post(served.url + "/detokenize", json={"tokens": [5, 999999]})
    assert bad.status_code == 400 and "999999" in bad.json()["error"]["message"]
    assert httpx.post(served.url + "/tokenize", json={}).status_code == 400

    # echo with logprobs: the prompt leads the text and the logprobs (its first token unscored)
    prompt = "Once upon a time"
    n_prompt = len(tokenizer.encode(prompt))
    e = client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0.0, user="u-1",
        extra_body={"metadata": {"team": "x"}, "ignore_eos": True},
    )  # fmt: skip
    c = e.choices[0]
    assert c.text.startswith(prompt) and len(c.text) > len(prompt)
    assert len(c.logprobs.tokens) == n_prompt + 3
    assert c.logprobs.token_logprobs[0] is None and all(lp is not None for lp in c.logprobs.token_logprobs[1:])
    assert "".join(c.logprobs.tokens[1:]) == c.text
    streamed = client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert [t for ch in chunks if ch.choices for t in ch.choices[0].logprobs.tokens] == c.logprobs.tokens
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.prompt_tokens == n_prompt

    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=MODEL, prompt="def f(", suffix="return x", max_tokens=2)


def _calls(message) -> list[tuple[str, dict]]:
    return [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls or []]


def _check_calls(message) -> list[tuple[str, dict]]:
    calls = _calls(message)
    assert calls, message
    for tool_call, (name, args) in zip(message.tool_calls, calls):
        assert tool_call.type == "function" and tool_call.id.startswith("call_")
        jsonschema.validate(args, TOOL_SCHEMAS[name])
    return calls


USER = [{"role": "user", "content": "What is the weather in Paris?"}]
PARALLEL = dict(
    model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", n=6, temperature=1.0, seed=13, max_tokens=150,
    logit_bias={"128009": 5},
)  # fmt: skip


def test_tool_choice_required_named_and_parallel(client):
    r = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        n=4, temperature=1.0, seed=11, max_tokens=40,
    )  # fmt: skip
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert len(_check_calls(c.message)) == 1
    named = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, n=3, temperature=1.0, seed=12, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False,
    )  # fmt: skip
    for c in named.choices:
        assert c.finish_reason == "tool_calls"
        assert [name for name, _ in _check_calls(c.message)] == ["get_time"]
    # Random weights rarely stop after a call on their own: a small push to <|eot_id|> lets
    # both one call and several happen (the grammar alone decides what parses).
    parallel = client.chat.completions.create(**PARALLEL)
    counts = [len(_check_calls(c.message)) for c in parallel.choices]
    assert max(counts) >= 2, counts
    for bad, named_in_error in (
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tool_choice": "sometimes"}, "sometimes"),
        ({"tool_choice": "required", "tools": [{"type": "retrieval"}]}, "function"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=USER, **{"tools": TOOLS, **bad})
        assert named_in_error in e.value.message


def test_streamed_tool_calls_reassemble_to_the_answer(client):
    """Calls stream as OpenAI streams them: id, type and name first, then the arguments in pieces
    as the model writes them (not in one piece at the end); they add up to the very strings of
    the non-streaming answer."""
    answer = client.chat.completions.create(**PARALLEL).choices
    calls: dict[int, dict[int, dict]] = {c.index: {} for c in answer}  # choice -> call index -> call
    finish: dict[int, str] = {}
    pieces = []  # argument deltas per call
    for chunk in client.chat.completions.create(**PARALLEL, stream=True):
        for ch in chunk.choices:
            assert not ch.delta.content
            for d in ch.delta.tool_calls or []:
                if d.index not in calls[ch.index]:  # the first delta of a call names it
                    assert d.id.startswith("call_") and d.type == "function" and d.function.name
                    assert d.function.arguments == ""
                    calls[ch.index][d.index] = {"name": d.function.name, "arguments": "", "pieces": 0}
                    continue
                assert d.id is None and d.function.name is None and d.function.arguments
                calls[ch.index][d.index]["arguments"] += d.function.arguments
                calls[ch.index][d.index]["pieces"] += 1
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert max(len(c) for c in calls.values()) >= 2
    for c in answer:
        assert finish[c.index] == "tool_calls" == c.finish_reason
        streamed = [(call["name"], call["arguments"]) for _, call in sorted(calls[c.index].items())]
        assert streamed == [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
        pieces += [call["pieces"] for call in calls[c.index].values() if len(call["arguments"]) > 8]
    assert pieces and min(pieces) >= 2, pieces  # arguments of more than a few characters arrive in pieces


def test_auto_tool_choice_and_a_follow_up_turn(client, served, tokenizer):
    # auto: a call-shaped output (forced here by a schema, since the weights are random) is parsed
    shaped = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "parameters": TOOL_SCHEMAS["get_weather"]},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="auto", temperature=1.0, seed=5, max_tokens=60,
        extra_body={"guided_json": shaped},
    )  # fmt: skip
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (name, args), *_ = _check_calls(c.message)
    # ... and plain text stays content
    text = client.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, temperature=1.0, seed=5, max_tokens=20,
        extra_body={"guided_regex": "[a-z]{3,8}( [a-z]{3,8}){0,3}"},
    ).choices[0]  # fmt: skip
    assert text.finish_reason == "stop" and text.message.tool_calls is None and text.message.content

    # the follow-up turn: the assistant's call and the tool's result render through the template
    call_id = c.message.tool_calls[0].id
    follow = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [c.message.tool_calls[0].model_dump()]},
        {"role": "tool", "tool_call_id": call_id, "content": "22 degrees and sunny"},
    ]
    again = client.chat.completions.create(model=MODEL, messages=follow, tools=TOOLS, max_tokens=4, temperature=0.0)
    assert again.choices[0].finish_reason in ("stop", "length")
    ids = httpx.post(served.url + "/tokenize", json={"messages": follow}).json()["tokens"]
    rendered = tokenizer.decode(ids)
    assert f'{{"name": "{name}", "parameters": {json.dumps(args)}}}' in rendered
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n22 degrees and sunny<|eot_id|>" in rendered


def test_embeddings_are_the_pooled_final_hidden_states(client, served, tokenizer):
    """/v1/embeddings against transformers: the final norm's output, mean- or last-token-pooled,
    L2-normalised; base64 (the openai client's default) and float agree."""
    import numpy as np
    import torch
    from conftest import load_reference

    texts = ["Hello world", "A longer sentence about the weather in Paris"]
    got = client.embeddings.create(model=MODEL, input=texts, user="u-1")
    assert [d.index for d in got.data] == [0, 1]
    assert got.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)
    reference = load_reference(served.engine.model_path)
    for pooling in ("mean", "last"):
        body = {"model": MODEL, "input": texts, "encoding_format": "float", "pooling": pooling}
        floats = httpx.post(served.base_url + "/embeddings", json=body, timeout=60).json()["data"]
        for text, item in zip(texts, floats):
            with torch.no_grad():
                states = reference.model(torch.tensor([tokenizer.encode(text)])).last_hidden_state[0]
            want = states.mean(0) if pooling == "mean" else states[-1]
            want = (want / want.norm()).numpy()
            vector = np.asarray(item["embedding"], np.float32)
            assert vector.shape == (64,) and abs(np.linalg.norm(vector) - 1) < 1e-5
            np.testing.assert_allclose(vector, want, atol=2e-4)
        if pooling == "mean":
            np.testing.assert_allclose(np.asarray(got.data[0].embedding), floats[0]["embedding"], atol=1e-6)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=MODEL, input="hi", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="pooling"):
        client.embeddings.create(model=MODEL, input="hi", extra_body={"pooling": "max"})
