"""Offline batch inference over a Ray Dataset: one engine per actor, rows in, generations out.

    python examples/ray_data_batch.py                  # the embedded default model, CPU
    python examples/ray_data_batch.py MODEL_DIR --devices cuda --concurrency 4 --tensor-parallel-size 2

Rows carry a `prompt` (text) or `messages` (chat), optionally their own `sampling_params`, and any
other columns, which pass through. Output rows add generated_text, generated_token_ids,
num_input_tokens, num_generated_tokens, finish_reason and error (a bad row gets its reason there;
the others complete). The same code reads Parquet/JSON from cloud storage on a cluster:
`ray.data.read_parquet("s3://...")` and `.write_parquet(...)`.
"""

from __future__ import annotations

import argparse

import ray

from llama3_dist import SamplingParams
from llama3_dist.ray_data import build_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the embedded one)")
    parser.add_argument("--devices", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1, help="actors, one engine each")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False)
    topics = ["rivers", "clocks", "harbors", "lanterns", "mountains", "bridges", "orchards", "songs"]
    rows = [{"id": i, "prompt": f"A short note about {topics[i % len(topics)]}:"} for i in range(args.rows)]
    rows.append({"id": args.rows, "messages": [{"role": "user", "content": "Say hello."}]})
    rows.append({"id": args.rows + 1, "prompt": "Tell a story", "sampling_params": {"temperature": 0.8, "seed": 1}})
    rows.append({"id": args.rows + 2, "prompt": "", "note": "a bad row: it gets an error, the rest complete"})

    processor = build_processor(
        args.model,
        tensor_parallel_size=args.tensor_parallel_size,
        devices=args.devices,
        concurrency=args.concurrency,
        batch_size=16,
        sampling_params=SamplingParams(temperature=0, max_tokens=args.max_tokens),
    )
    out = sorted(processor(ray.data.from_items(rows)).take_all(), key=lambda row: row["id"])
    for row in out[:3] + out[-3:]:
        what = row.get("prompt") or row.get("messages")
        result = f"error: {row['error']}" if row["error"] else f"{row['generated_text']!r} [{row['finish_reason']}]"
        print(f"{row['id']:3d} {what!r} -> {result}")
    tokens = sum(row["num_generated_tokens"] for row in out)
    errors = sum(row["error"] is not None for row in out)
    print(f"{len(out)} rows, {tokens} tokens generated, {errors} with an error")


if __name__ == "__main__":
    main()
