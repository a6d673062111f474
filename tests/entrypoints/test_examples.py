"""Every example runs as written (on CPU, the embedded default model), and the `llama3-dist serve`
and `bench` commands work end to end."""

from __future__ import annotations

import json
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llama3_dist.entrypoints import cli
from llama3_dist.entrypoints.bench import read_server_url, stop_server_process

pytestmark = [pytest.mark.subprocess]

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CLI = [sys.executable, "-m", "llama3_dist"]


def run(args: list[str], timeout: float = 180) -> str:
    r = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert r.returncode == 0, f"{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout


def run_here(script: Path, args: list[str], capsys) -> str:
    """Runs an example as __main__ in this process (which has already paid for importing torch and
    transformers, seconds on a small machine)."""
    argv = sys.argv
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        assert e.code in (None, 0), f"{script.name} exited with {e.code}"
    finally:
        sys.argv = argv
    return capsys.readouterr().out


def test_generate_example(capsys):
    out = run_here(EXAMPLES / "generate.py", ["--max-tokens", "6"], capsys)
    assert "[batch of 3: 18 tokens" in out and "sample 1:" in out and "chat (" in out
    assert "[finished: length]" in out


def test_tensor_parallel_example(ray_local, capsys):
    # in this process, so its ranks join the session's Ray instead of starting one more
    out = run_here(EXAMPLES / "tensor_parallel.py", ["--max-tokens", "6", "--cpu"], capsys)
    assert "TP=1 on ['cpu'], TP=2 on ['cpu', 'cpu']" in out
    assert "4/4 generations identical at TP=1 and TP=2" in out


@pytest.fixture(scope="module", autouse=True)
def serve_process():
    """`llama3-dist serve` (the embedded default) with an API key, on a free port; started first
    so that it loads while the other examples run."""
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--api-key", "k3y", "--log-level", "warning"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    try:
        yield proc
    finally:
        stop_server_process(proc, 20)


@pytest.fixture(scope="module")
def serve_cli(serve_process):
    url = read_server_url(serve_process, timeout=120)
    assert url.startswith("http://127.0.0.1:")
    return serve_process, url


def test_openai_client_example(serve_cli):
    _, url = serve_cli
    out = run([str(EXAMPLES / "openai_client.py"), "--base-url", url + "/v1", "--api-key", "k3y", "--max-tokens", "5"])
    assert "model: llama3-dist-default" in out
    assert "completion: " in out and "chat: " in out and "[5 tokens streamed]" in out
    assert "bad request refused: 400 temperature must be >= 0 (0 means greedy), got -1.0" in out


def test_bench_command_and_clean_shutdown(serve_cli, capsys):
    proc, url = serve_cli
    assert (
        cli.main(
            [
                "bench",
                "--base-url",
                url + "/v1",
                "--api-key",
                "k3y",
                "--num-prompts",
                "4",
                "--concurrency",
                "2",
                "--input-len",
                "8",
                "--output-len",
                "4",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["output_tokens"] == 16 and result["requests_per_s"] > 0
    assert 0 < result["ttft_ms_p50"] <= result["ttft_ms_p99"] and 0 < result["itl_ms_p50"] <= result["itl_ms_p99"]
    # Ctrl-C stops the server cleanly
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    assert "Traceback" not in proc.stderr.read()


def test_ray_serve_example(ray_local, capsys):
    """Two replicas on the session's Ray: each topic's requests hit one replica's prefix cache."""
    out = run_here(EXAMPLES / "ray_serve.py", ["--port", str(free_port()), "--max-tokens", "4"], capsys)
    assert out.count(" -> ") == 8 and "stream: " in out
    hits = [int(h) for h in re.findall(r"tokens generated, (\d+) of \d+ prompt tokens", out)]
    assert len(hits) == 2 and sum(hits) > 0, out


def test_serve_command_with_replicas(tmp_path):
    """`llama3-dist serve --num-replicas 2`: Ray Serve behind the same OpenAI routes (the openai
    client example passes against it, API key included), /replicas lists both engines, and
    SIGTERM shuts Serve and its private Ray down cleanly."""
    import httpx

    proc = subprocess.Popen(
        [*CLI, "serve", "--num-replicas", "2", "--devices", "cpu", "--port", "0", "--api-key", "k3y"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr").open("w"),  # Ray and Serve log there; a pipe could fill and block
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "RAY_ADDRESS": ""},
    )
    try:
        url = read_server_url(proc, timeout=180)
        example = [str(EXAMPLES / "openai_client.py"), "--base-url", url + "/v1", "--api-key", "k3y"]
        out = run([*example, "--max-tokens", "5"])
        assert "model: llama3-dist-default" in out and "[5 tokens streamed]" in out
        assert "bad request refused: 400 temperature must be >= 0 (0 means greedy), got -1.0" in out
        replicas = httpx.get(url + "/replicas", headers={"Authorization": "Bearer k3y"}, timeout=30).json()
        assert len(replicas["replicas"]) == 2, replicas
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "Traceback" not in (tmp_path / "stderr").read_text()
    finally:
        stop_server_process(proc, 20)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_data_batch_example(ray_local, capsys, tmp_path):
    """JSONL in, JSONL out through the session's Ray: every row back, the bad one with its error."""
    out = run_here(
        EXAMPLES / "ray_data_batch.py", ["--rows", "8", "--max-tokens", "4", "--output", str(tmp_path / "out")], capsys
    )
    assert re.search(r"11 rows from \S+prompts\.jsonl to \S+out: 40 tokens generated, 1 with an error", out), out
    assert "error: prompt must not be empty" in out


def test_sigterm_drains_the_streams_under_way(tmp_path):
    """SIGTERM mid-stream: the stream still gets every token, new connections are refused, exit 0."""
    import httpx
    import openai

    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--drain-timeout", "60"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr").open("w"),
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    try:
        url = read_server_url(proc, timeout=120)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.completions.create(
            model="llama3-dist-default",
            prompt="Once upon a time",
            max_tokens=300,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)
        proc.send_signal(signal.SIGTERM)
        usage = [c.usage for c in chunks if c.usage is not None]
        assert usage and usage[-1].completion_tokens == 300  # the stream under way finished
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
        assert "Traceback" not in (tmp_path / "stderr").read_text()
    finally:
        stop_server_process(proc, 20)
