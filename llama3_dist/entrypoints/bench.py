"""`llama3-dist bench`: a load test of an OpenAI-compatible server with concurrent streaming
clients (time to first token, inter-token latency, throughput), and the helpers that run a
`llama3-dist serve` subprocess for it and for the tests."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass

_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hum",
    "old",
    "songs",
    "about",
    "rivers",
    "mountains",
    "clocks",
    "lanterns",
    "bridges",
    "and",
    "distant",
    "harbors",
]


@dataclass
class BenchConfig:
    num_prompts: int = 64
    concurrency: int = 16
    input_len: int = 32  # words; about one token each
    output_len: int = 64
    api_key: str | None = None
    model: str | None = None
    temperature: float = 0.0
    seed: int = 0
    prompts: list[str] | None = None  # instead of num_prompts random ones (benchmarks with a workload of their own)


def _bench_prompts(cfg: BenchConfig) -> list[str]:
    import random

    if cfg.prompts is not None:
        return list(cfg.prompts)
    rng = random.Random(cfg.seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(cfg.input_len)) for _ in range(cfg.num_prompts)]


async def _bench_async(base_url: str, cfg: BenchConfig) -> dict:
    import httpx
    import numpy as np

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency + 2, max_keepalive_connections=cfg.concurrency + 2)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=None, limits=limits) as client:
        model = cfg.model
        if model is None:
            r = await client.get("/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]

        async def one(prompt: str, max_tokens: int) -> dict:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": cfg.temperature,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            start = time.perf_counter()
            times, usage = [], None
            async with client.stream("POST", "/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        raise RuntimeError(data["error"]["message"])
                    if data.get("usage"):
                        usage = data["usage"]
                    if data["choices"]:
                        times.append(time.perf_counter())
            return {"start": start, "times": times, "end": time.perf_counter(), "usage": usage}

        await one("warm up", 4)  # the first step pays one-off costs
        prompts = _bench_prompts(cfg)
        sem = asyncio.Semaphore(cfg.concurrency)

        async def limited(p):
            async with sem:
                return await one(p, cfg.output_len)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        duration = time.perf_counter() - t0
    ttft = np.array([r["times"][0] - r["start"] for r in results if r["times"]])
    itl = np.concatenate([np.diff(r["times"]) for r in results if len(r["times"]) > 1] or [np.zeros(0)])
    out_tokens = sum(r["usage"]["completion_tokens"] for r in results)
    in_tokens = sum(r["usage"]["prompt_tokens"] for r in results)
    pct = lambda a, q: float(np.percentile(a, q) * 1e3) if len(a) else float("nan")  # noqa: E731
    return {
        "base_url": base_url,
        "model": model,
        "num_prompts": len(prompts),
        "concurrency": cfg.concurrency,
        "prompt_tokens": in_tokens,
        "output_tokens": out_tokens,
        "duration_s": duration,
        "requests_per_s": len(prompts) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "ttft_ms_p50": pct(ttft, 50),
        "ttft_ms_p99": pct(ttft, 99),
        "ttft_ms_mean": float(ttft.mean() * 1e3),
        "itl_ms_p50": pct(itl, 50),
        "itl_ms_p99": pct(itl, 99),
        "itl_ms_mean": float(itl.mean() * 1e3),
    }


def format_bench(r: dict) -> str:
    return "\n".join(
        [
            f"model {r['model']} at {r['base_url']}: {r['num_prompts']} requests, {r['concurrency']} concurrent",
            f"  prompt tokens {r['prompt_tokens']}, output tokens {r['output_tokens']}, {r['duration_s']:.2f} s",
            f"  requests/s          {r['requests_per_s']:.2f}",
            f"  output tokens/s     {r['output_tokens_per_s']:.1f}",
            f"  time to first token p50 {r['ttft_ms_p50']:.1f} ms  p99 {r['ttft_ms_p99']:.1f} ms",
            f"  inter-token latency p50 {r['itl_ms_p50']:.1f} ms  p99 {r['itl_ms_p99']:.1f} ms",
        ]
    )


def _serve_args(model_dir, engine_kwargs: dict) -> list[str]:
    """engine_kwargs -> `llama3-dist serve` flags (the ones the CLI has)."""
    args = [str(model_dir)] if model_dir is not None else []
    flags = {
        "devices": "--devices",
        "dtype": "--dtype",
        "max_num_seqs": "--max-num-seqs",
        "max_num_batched_tokens": "--max-num-batched-tokens",
        "max_seq_len": "--max-model-len",
        "kv_cache_bytes": "--kv-cache-bytes",
        "seed": "--seed",
    }
    for key, value in engine_kwargs.items():
        if value is None or value is False:
            continue
        if key == "enforce_eager":  # a switch
            args.append("--enforce-eager")
            continue
        if key not in flags:
            raise ValueError(f"bench cannot pass {key}={value!r} to the server; start it yourself and use --base-url")
        args += [flags[key], ",".join(value) if isinstance(value, list) else str(value)]
    return args


def stop_server_process(proc, timeout: float) -> None:
    """Ends a `llama3-dist serve` subprocess as Ctrl-C would (clean shutdown), killing it if it
    has not exited within timeout seconds."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_bench(
    cfg: BenchConfig,
    base_url: str | None = None,
    model_dir=None,
    engine_kwargs: dict | None = None,
    start_timeout: float = 600.0,
) -> dict:
    """Benchmarks the server at base_url or, without one, a `llama3-dist serve` subprocess (on a free
    local port) for model_dir, stopped afterwards."""
    if base_url is not None:
        return asyncio.run(_bench_async(base_url.rstrip("/"), cfg))
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "llama3_dist",
        "serve",
        *_serve_args(model_dir, engine_kwargs or {}),
        "--port",
        "0",
        "--log-level",
        "warning",
    ]
    env = dict(os.environ)
    if cfg.api_key:
        cmd += ["--api-key", cfg.api_key]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = read_server_url(proc, start_timeout)
        return asyncio.run(_bench_async(url + "/v1", cfg))
    finally:
        stop_server_process(proc, 30)


def read_server_url(proc, timeout: float) -> str:
    """The URL a `llama3-dist serve` subprocess prints once it is ready."""
    found: list[str] = []

    def read():
        for line in proc.stdout:
            if " at http" in line and not found:
                found.append(line.rsplit(" at ", 1)[1].strip().removesuffix("/v1"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not found:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server was not ready within {timeout:g} s")
        reader.join(0.05)
    # the URL line comes just before uvicorn starts; wait until it answers
    import httpx

    while True:
        try:
            httpx.get(found[0] + "/health", timeout=1.0)
            return found[0]
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server printed its URL but does not answer") from None
            time.sleep(0.05)
