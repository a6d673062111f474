"""Ray Serve (issue 13): the OpenAI app over engine replicas, through the real openai client on
Serve's HTTP port, against one deployment of two replicas at TP=2: outputs equal LLM.generate,
streaming, bad input, prefix-aware routing read from per-replica prefix-cache counters; then,
last, self-healing (ranks inside each replica's placement group; a killed rank is rebuilt inside
its replica, and a replica past its restart budget fails its health check and Serve replaces it;
every request still completes). One Serve instance on the session's Ray."""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx
import openai
import pytest

from llama3_dist import LLM, SamplingParams

pytestmark = [pytest.mark.slow]

ENGINE = dict(dtype="float32", kv_cache_bytes=16 << 20, max_num_seqs=16)
PROMPTS = ["The capital of France is", "One, two, three,", "Hello there my friend"]
MAX_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def serve_port(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")
def reference(tokenized_checkpoint):
    """LLM.generate / LLM.chat on the same checkpoint in this process: what every replica must give."""
    with LLM(tokenized_checkpoint, devices=["cpu"], **ENGINE) as llm:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        texts = {p: o.outputs[0].text for p, o in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False))}
        chat = llm.chat([{"role": "user", "content": "Say hi"}], params, use_tqdm=False)[0].outputs[0].text
        yield {"completions": texts, "chat": chat}


def deploy(name: str, port: int, model: str, **kwargs):
    from ray import serve

    from llama3_dist.ray_serve import build_openai_app

    app = build_openai_app(model, devices="cpu", served_model_name="tiny", health_check_period_s=1, **ENGINE, **kwargs)
    serve.run(app, name=name, route_prefix="/")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


def replicas(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/replicas", timeout=30).json()["replicas"]


def fresh_replicas(port: int) -> dict:
    """The replicas' counters as reported after now: Serve polls them every routing-stats period."""
    since = time.time()
    return wait_for(
        lambda: (r := replicas(port)) and all(s["reported_at"] > since for s in r.values()) and r,
        "every replica to report its counters",
    )


def check_outputs(client: openai.OpenAI, reference: dict) -> None:
    greedy = dict(model="tiny", max_tokens=MAX_TOKENS, temperature=0)
    for prompt in PROMPTS:
        assert client.completions.create(prompt=prompt, **greedy).choices[0].text == reference["completions"][prompt]
    batch = client.completions.create(prompt=PROMPTS, **greedy)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [
        reference["completions"][p] for p in PROMPTS
    ]
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "Say hi"}], **greedy)
    assert chat.choices[0].message.content == reference["chat"]


@pytest.fixture(scope="module")
def client(serve_port, tokenized_checkpoint):
    """One deployment for the whole module (each takes ~25 s to start on 2 cores): two replicas at
    TP=2, a restart budget of one. The self-healing test, which kills ranks, runs last."""
    from ray import serve

    yield deploy("tp2", serve_port, tokenized_checkpoint, num_replicas=2, tensor_parallel_size=2, max_restarts=1)
    serve.delete("tp2")


class TestTwoReplicas:
    def test_outputs_equal_llm_generate(self, client, reference, serve_port):
        check_outputs(client, reference)
        assert len(replicas(serve_port)) == 2
        assert httpx.get(f"http://127.0.0.1:{serve_port}/health").json() == {"status": "ok"}
        assert [m.id for m in client.models.list().data] == ["tiny"]

    def test_streaming(self, client, reference):
        prompt = PROMPTS[0]
        chunks = list(
            client.completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == reference["completions"][prompt]
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Say hi"}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
            )
        )
        assert text == reference["chat"]

    def test_bad_input_is_a_400_and_the_replicas_keep_serving(self, client, reference):
        with pytest.raises(openai.BadRequestError, match=r"temperature must be >= 0.*got -1"):
            client.completions.create(model="tiny", prompt="hi", max_tokens=4, temperature=-1)
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.completions.create(model="tiny", prompt="hi " * 600, max_tokens=4)
        check_outputs(client, reference)

    def test_repeated_prefixes_go_to_one_replica(self, client, serve_port, tokenized_checkpoint):
        """Per prefix, four requests one after another: every prefix-cache hit they cause lands on
        one replica, which the other three find their prefix on (the counters come from each
        replica's engine, through Serve's routing stats)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenized_checkpoint)
        for topic in ("astronomy and the planets", "cooking with garlic and lemons"):
            shared = f"You are a helpful assistant who answers questions about {topic}. " * 3
            blocks = len(tokenizer.encode(shared)) // 16
            before = fresh_replicas(serve_port)
            for i in range(4):
                client.completions.create(
                    model="tiny",
                    prompt=f"{shared}Question {i}: why?",
                    max_tokens=4,
                    temperature=0,
                    extra_body={"ignore_eos": True},
                )
            after = fresh_replicas(serve_port)

            def grew(field: str) -> dict[str, int]:
                return {r: after[r][field] - before.get(r, {}).get(field, 0) for r in after}  # noqa: B023

            assert sum(grew("num_generated_tokens").values()) == 16, (before, after)
            hits = grew("prefix_cache_hits")
            served = [r for r, h in hits.items() if h > 0]
            assert len(served) == 1, f"{topic}: prefix-cache hits on {hits}"
            assert hits[served[0]] >= 3 * blocks, f"{topic}: {hits}, {blocks} shared blocks per request"


def test_tp2_replicas_hold_their_ranks_heal_a_killed_rank_and_get_replaced_past_their_budget(
    client, serve_port, reference
):
    """Two replicas at TP=2 with max_restarts=1. A killed rank is rebuilt inside its replica (new
    rank processes in the replica's own placement group); a second kill spends the budget, the
    engine dies, its health check fails and Serve replaces the replica. Every request completes
    throughout, on the survivor or after a retry."""
    check_outputs(client, reference)
    before = replicas(serve_port)
    assert len(before) == 2
    for rid, info in before.items():
        assert info["placement_group_id"], f"replica {rid} runs outside a placement group"
        assert [r["placement_group_id"] for r in info["ranks"]] == [info["placement_group_id"]] * 2, info

    victim, survivor = sorted(before)
    prompt = PROMPTS[0]

    def request_ok() -> None:
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert out.choices[0].text == reference["completions"][prompt]

    os.kill(before[victim]["ranks"][1]["pid"], signal.SIGKILL)

    def healed():
        request_ok()
        info = replicas(serve_port).get(victim, {})
        return info if info.get("num_restarts") == 1 and info.get("alive") else None

    info = wait_for(healed, "the replica to rebuild its killed rank", timeout=120)
    old_pids = {r["pid"] for r in before[victim]["ranks"]}
    assert not {r["pid"] for r in info["ranks"]} & old_pids, info
    assert [r["placement_group_id"] for r in info["ranks"]] == [before[victim]["placement_group_id"]] * 2

    os.kill(info["ranks"][1]["pid"], signal.SIGKILL)  # the budget of one restart is spent

    def replaced():
        request_ok()
        now = replicas(serve_port)
        fresh = [r for r in now if r not in before]
        done = victim not in now and survivor in now and len(fresh) == 1 and now[fresh[0]].get("alive")
        return now if done else None

    after = wait_for(replaced, "Serve to replace the replica whose engine died", timeout=180)
    (new,) = set(after) - {survivor}
    assert [r["placement_group_id"] for r in after[new]["ranks"]] == [after[new]["placement_group_id"]] * 2
    check_outputs(client, reference)
