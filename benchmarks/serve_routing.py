"""Ray Serve replicas and prefix-aware routing, side by side on one workload and the same CPUs:

    A  1 replica  holding all the CPUs
    B  2 replicas, half the CPUs each, round-robin routing
    C  2 replicas, half the CPUs each, prefix-aware routing (llama3_dist.serve_routers)

Workload: concurrent streaming completions where half of the requests open with one of 32 long
shared "system prompts" and half are unique; the replicas' KV caches together hold every shared
prefix once, besides the running sequences, but not once per replica (the same total memory in
every configuration). That is where routing matters: round-robin makes every replica hold every
prefix, so they evict each other's prefixes; prefix-aware routing gives each prefix one home.
Reported per configuration: requests/s, output tokens/s, time to first token p50/p99, and the
prefix-cache hit rate summed over the replicas (prompt tokens read from the cache / prompt tokens
looked up, from each replica's counters).

    python benchmarks/serve_routing.py                          # the embedded default model, 2 CPUs
    python benchmarks/serve_routing.py MODEL_DIR --cpus 8 --requests 256 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx
import ray
from ray import serve

from llama3_dist.entrypoints.bench import BenchConfig, _bench_async
from llama3_dist.ray_serve import build_openai_app

WORDS = [
    "river",
    "stone",
    "lantern",
    "clock",
    "harbor",
    "bridge",
    "mountain",
    "wizard",
    "song",
    "seven",
    "quiet",
    "distant",
    "old",
    "orchard",
]


def workload(requests: int, shared_prefixes: int, prefix_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    systems = [" ".join(rng.choice(WORDS) for _ in range(prefix_words)) for _ in range(shared_prefixes)]
    prompts = []
    for i in range(requests):
        question = " ".join(rng.choice(WORDS) for _ in range(12))
        if i % 2 == 0:  # half open with a shared system prompt
            prompts.append(f"{rng.choice(systems)}\nQuestion {i}: {question}")
        else:  # half are unique from the first token
            prompts.append(f"{i} " + " ".join(rng.choice(WORDS) for _ in range(prefix_words)) + f"\n{question}")
    rng.shuffle(prompts)
    return prompts


def fresh_counters(base_url: str) -> dict:
    """Every replica's counters as reported after now (Serve polls them once a second)."""
    since = time.time()
    while True:
        replicas = httpx.get(base_url + "/replicas", timeout=30).json()["replicas"]
        if replicas and all(r.get("reported_at", 0) > since for r in replicas.values()):
            return replicas
        time.sleep(0.2)


def run_configuration(name: str, args, port: int, prompts: list[str], **app_kwargs) -> dict:
    app = build_openai_app(
        args.model,
        devices="cpu",
        dtype=args.dtype,
        max_num_seqs=args.concurrency,
        kv_cache_bytes=args.kv_cache_bytes // app_kwargs["num_replicas"],
        **app_kwargs,
    )
    serve.run(app, name=name, route_prefix="/")
    base_url = f"http://127.0.0.1:{port}"
    try:
        # The routers (and with them the replicas' counters) appear with the first request.
        warm = {"model": httpx.get(base_url + "/v1/models").json()["data"][0]["id"], "prompt": "hi", "max_tokens": 2}
        httpx.post(base_url + "/v1/completions", json=warm, timeout=120).raise_for_status()
        before = fresh_counters(base_url)
        cfg = BenchConfig(concurrency=args.concurrency, output_len=args.output_len, prompts=prompts)
        result = asyncio.run(_bench_async(base_url + "/v1", cfg))
        after = fresh_counters(base_url)
    finally:
        serve.delete(name)

    def grew(field: str) -> int:
        return sum(after[r][field] - before.get(r, {}).get(field, 0) for r in after)

    hits, queries = grew("prefix_cache_hits"), grew("prefix_cache_queries")
    per_replica = {r: after[r]["prefix_cache_hits"] - before.get(r, {}).get("prefix_cache_hits", 0) for r in after}
    return {
        "configuration": name,
        **{k: result[k] for k in ("requests_per_s", "output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50")},
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "prefix_cache_hits_per_replica": sorted(per_replica.values()),
        "prompt_tokens": result["prompt_tokens"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the embedded one)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for the engines, split between the replicas")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--shared-prefixes", type=int, default=32)
    parser.add_argument("--prefix-words", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--kv-cache-bytes",
        type=int,
        default=32 << 20,
        help="KV cache of all replicas together, split evenly: the default holds every shared prefix once "
        "besides the running sequences, not once per replica",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per configuration")
    args = parser.parse_args()

    prompts = workload(args.requests, args.shared_prefixes, args.prefix_words)
    # The engines get --cpus; the ingress and Serve's proxy share one more.
    ray.init(address="local", num_cpus=args.cpus + 1, include_dashboard=False)
    port = 8000 + random.Random().randrange(1000)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    half = args.cpus / 2
    configurations = [
        ("one-replica", dict(num_replicas=1, replica_cpus=float(args.cpus))),
        ("two-replicas-round-robin", dict(num_replicas=2, replica_cpus=half, routing="round_robin")),
        ("two-replicas-prefix", dict(num_replicas=2, replica_cpus=half, routing="prefix")),
    ]
    results = []
    try:
        for name, kwargs in configurations:
            results.append(run_configuration(name, args, port, prompts, **kwargs))
            r = results[-1]
            print(
                json.dumps(r)
                if args.json
                else f"{name:26s} {r['requests_per_s']:6.2f} req/s {r['output_tokens_per_s']:7.1f} tok/s  "
                f"TTFT p50 {r['ttft_ms_p50']:7.0f} ms p99 {r['ttft_ms_p99']:7.0f} ms  "
                f"prefix-cache hit rate {r['prefix_cache_hit_rate']:5.1%} (hits per replica "
                f"{r['prefix_cache_hits_per_replica']})",
                flush=True,
            )
    finally:
        serve.shutdown()
        ray.shutdown()
    by_name = {r["configuration"]: r for r in results}
    prefix, round_robin, one = (
        by_name["two-replicas-prefix"],
        by_name["two-replicas-round-robin"],
        by_name["one-replica"],
    )
    print(
        f"prefix vs round-robin: hit rate {prefix['prefix_cache_hit_rate']:.1%} vs "
        f"{round_robin['prefix_cache_hit_rate']:.1%}, "
        f"requests/s x{prefix['requests_per_s'] / round_robin['requests_per_s']:.2f}, "
        f"TTFT p50 x{prefix['ttft_ms_p50'] / round_robin['ttft_ms_p50']:.2f}; "
        f"prefix vs one replica: requests/s x{prefix['requests_per_s'] / one['requests_per_s']:.2f}"
    )


if __name__ == "__main__":
    main()
