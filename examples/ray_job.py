"""A Ray job: tensor-parallel generation on the cluster this driver runs in.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python examples/ray_job.py --model /shared/Llama-3.1-8B-Instruct --devices cuda:0,cuda:1

(On a cluster started with `ray start`, Ray 2.60 uses token authentication: submit with
RAY_AUTH_MODE=token set and the cluster's token in ~/.ray/auth_token.) The driver joins the cluster
(ray.init(address="auto")), the LLM places one actor per device in a placement group, and the
results and throughput go to the job's logs; the last line is `RESULT {json}` for scripts.
--model must be a path every node can read; without it, the embedded default model is built on the
driver's node.
"""

from __future__ import annotations

import argparse
import json
import time

import ray

from llama3_dist import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Ray jobs run on",
    "Tensor parallelism splits each layer",
    "Once upon a time",
    "The quick brown fox",
    "def main():",
    "Llamas live in",
    "In 1969, the",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory on the cluster (default: embedded)")
    parser.add_argument("--devices", default="cpu,cpu", help="one tensor-parallel rank each: cpu,cpu | cuda:0,cuda:1")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=len(PROMPTS))
    args = parser.parse_args()

    ray.init(address="auto")
    resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    print(f"joined a Ray cluster of {len(ray.nodes())} node(s) with {resources}", flush=True)

    devices = args.devices.split(",")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    with LLM(args.model, devices=devices, dtype=args.dtype, show_progress=False) as llm:
        loaded = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        done = time.perf_counter()
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    for o in outputs:
        print(f"{o.prompt!r} -> {o.outputs[0].text!r}")
    print(
        f"TP={len(devices)} on {devices}: loaded in {loaded - start:.1f} s; {len(prompts)} prompts, {n_tokens} "
        f"tokens in {done - loaded:.2f} s: {len(prompts) / (done - loaded):.2f} requests/s, "
        f"{n_tokens / (done - loaded):.1f} tokens/s"
    )
    print(
        "RESULT "
        + json.dumps(
            {
                "devices": devices,
                "texts": [o.outputs[0].text for o in outputs],
                "token_ids": [o.outputs[0].token_ids for o in outputs],
                "tokens_per_s": n_tokens / (done - loaded),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
