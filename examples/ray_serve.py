"""Ray Serve: one OpenAI endpoint over several engine replicas, with prefix-aware routing.

    python examples/ray_serve.py              # 2 replicas of the embedded default model on CPU
    python examples/ray_serve.py MODEL_DIR --replicas 2 --tensor-parallel-size 2 --devices cuda

Each replica is a whole engine (tensor-parallel over its own devices, in its own placement group).
Requests whose prompts share a prefix go to the replica that already holds it in its KV prefix
cache; /replicas shows where each one's hits landed. The same app runs on a multi-node cluster
(ray job submit, or `serve run` on a config that calls build_openai_app).
"""

from __future__ import annotations

import argparse
import time

import httpx
import openai
import ray
from ray import serve

from llama3_dist.ray_serve import build_openai_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the embedded one)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--devices", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    try:
        app = build_openai_app(
            args.model,
            tensor_parallel_size=args.tensor_parallel_size,
            devices=args.devices,
            num_replicas=args.replicas,
            routing="prefix",
            max_num_seqs=32,
        )
        serve.run(app, name="llama3-dist", route_prefix="/")
        base_url = f"http://127.0.0.1:{args.port}"
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="EMPTY")
        model = client.models.list().data[0].id

        # Two "system prompts", four questions each: each system prompt's requests land on one
        # replica, where the shared prefix is computed once and then read from the prefix cache.
        for topic in ("astronomy", "cooking"):
            system = f"You are a patient expert in {topic}. Answer in one short sentence. " * 4
            for question in ("What is it?", "Why study it?", "Where to start?", "Who is famous in it?"):
                r = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                    max_tokens=args.max_tokens,
                    temperature=0,
                )
                print(f"{topic} / {question} -> {r.choices[0].message.content!r}")

        stream = client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=args.max_tokens, temperature=0, stream=True
        )
        print("stream:", "".join(chunk.choices[0].text for chunk in stream if chunk.choices))

        # Replicas report their counters every second (Serve's routing stats): read a report
        # made after the last request.
        since = time.time()
        while True:
            replicas = httpx.get(base_url + "/replicas", timeout=30).json()["replicas"]
            if all(info.get("reported_at", 0) > since for info in replicas.values()):
                break
            time.sleep(0.2)
        for replica_id, info in sorted(replicas.items()):
            print(
                f"replica {replica_id}: {info['num_generated_tokens']} tokens generated, "
                f"{info['prefix_cache_hits']} of {info['prefix_cache_queries']} prompt tokens from the prefix cache, "
                f"ranks on pids {[rank['pid'] for rank in info['ranks']]}"
            )
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


if __name__ == "__main__":
    main()
