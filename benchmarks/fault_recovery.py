"""Self-healing under load: a tensor-parallel engine behind the OpenAI server, streaming clients
for a while without faults, then as long again with one rank SIGKILLed every --kill-every seconds.

Reported: requests completed / sent in each phase (goal 100%), completed outputs compared with
the fault-free phase's output for the same prompt (greedy: goal all identical), latency p50/p99
with and without faults, and per kill the engine's rebuild time and the time from the kill to
the next token any client received.

    python benchmarks/fault_recovery.py                         # TP=2 on CPU, 5 + 5 minutes
    python benchmarks/fault_recovery.py --duration 60 --kill-every 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import time

import httpx
import ray

from llama3_dist.async_engine import AsyncLLMEngine
from llama3_dist.engine import LLMEngine
from llama3_dist.entrypoints.openai_server import ServerThread

WORDS = ["river", "stone", "lantern", "clock", "harbor", "bridge", "mountain", "wizard", "song", "orchard"]


async def load(base_url: str, prompts: list[str], args, seconds: float, token_times: list[float]) -> list[dict]:
    """`concurrency` clients, each sending the next prompt as soon as its last one ends."""
    results: list[dict] = []
    stop_at = time.monotonic() + seconds
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

        async def client_loop() -> None:
            while time.monotonic() < stop_at:
                i = next(counter) % len(prompts)
                body = {
                    "model": "bench",
                    "prompt": prompts[i],
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                }
                start, text, error = time.perf_counter(), "", None
                try:
                    async with client.stream("POST", "/completions", json=body) as r:
                        if r.status_code != 200:
                            error = f"HTTP {r.status_code}"
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            data = json.loads(line[6:])
                            if "error" in data:
                                error = data["error"]["message"]
                            elif data["choices"]:
                                text += data["choices"][0]["text"]
                                token_times.append(time.monotonic())
                except httpx.HTTPError as e:
                    error = f"{type(e).__name__}: {e}"
                results.append({"prompt": i, "text": text, "error": error, "seconds": time.perf_counter() - start})

        await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))
    return results


def summary(name: str, results: list[dict], reference: dict[int, str] | None) -> dict:
    done = [r for r in results if r["error"] is None]
    latencies = sorted(r["seconds"] for r in done)
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else float("nan")  # noqa: E731
    out = {
        "phase": name,
        "sent": len(results),
        "completed": len(done),
        "latency_ms_p50": pct(0.50),
        "latency_ms_p99": pct(0.99),
        "errors": sorted({r["error"] for r in results if r["error"]})[:3],
    }
    if reference is not None:
        compared = [r for r in done if r["prompt"] in reference]
        out["identical"] = sum(r["text"] == reference[r["prompt"]] for r in compared)
        out["compared"] = len(compared)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the embedded one)")
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of each phase")
    parser.add_argument("--kill-every", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args()

    prompts = [
        " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(6 + i % 10)) + f" {i}" for i in range(args.prompts)
    ]
    ray.init(address="local", include_dashboard=False)
    engine = AsyncLLMEngine(
        LLMEngine(
            args.model,
            devices=["cpu"] * args.tensor_parallel_size,
            dtype="float32",
            max_num_seqs=args.concurrency,
            max_restarts=10**6,  # every kill is healed: the budget is not what is measured
            show_progress=False,
        )
    )
    token_times: list[float] = []
    kills: list[dict] = []
    try:
        with ServerThread(engine, served_model_name="bench") as server:
            clean = asyncio.run(load(server.base_url, prompts, args, args.duration, token_times))
            reference = {r["prompt"]: r["text"] for r in clean if r["error"] is None}
            print(json.dumps(summary("no faults", clean, None)), flush=True)

            async def faulty() -> list[dict]:
                async def killer() -> None:
                    end = time.monotonic() + args.duration
                    while time.monotonic() + args.kill_every < end:
                        await asyncio.sleep(args.kill_every)
                        nodes = engine.engine.executor.nodes
                        rank = len(kills) % len(nodes)
                        restarts = engine.stats().num_restarts
                        at = time.monotonic()
                        os.kill(nodes[rank]["pid"], signal.SIGKILL)
                        kills.append({"rank": rank, "at": at, "restarts_before": restarts})

                task = asyncio.ensure_future(killer())
                results = await load(server.base_url, prompts, args, args.duration, token_times)
                task.cancel()
                return results

            token_times.clear()
            faulted = asyncio.run(faulty())
            stats = engine.stats()
    finally:
        engine.shutdown()
        ray.shutdown()
    print(json.dumps(summary(f"one rank killed every {args.kill_every:g} s", faulted, reference)), flush=True)
    for kill in kills:
        after = [t for t in token_times if t > kill["at"] + 0.05]
        kill["kill_to_next_token_s"] = round(min(after) - kill["at"], 2) if after else None
        del kill["at"]
    print(json.dumps({"kills": kills, "num_restarts": stats.num_restarts, "last_recovery_ms": stats.last_recovery_ms}))
    gaps = [k["kill_to_next_token_s"] for k in kills if k["kill_to_next_token_s"] is not None]
    if gaps:
        print(
            f"kill to next token: median {statistics.median(gaps):.2f} s, max {max(gaps):.2f} s over {len(gaps)} kills"
        )


if __name__ == "__main__":
    main()
