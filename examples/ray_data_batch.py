"""Offline batch inference with Ray Data: a JSONL file of prompts in, a JSONL of results out.

    python examples/ray_data_batch.py                            # sample prompts, the embedded model, CPU
    python examples/ray_data_batch.py --input prompts.jsonl --output results/ MODEL_DIR \\
        --devices cuda --tensor-parallel-size 2 --concurrency 4

Each input line is an object with `prompt` (text) or `messages` (chat), optionally its own
`sampling_params`, and any other fields, which pass through. Each output line adds
generated_text, generated_token_ids, num_input_tokens, num_generated_tokens, finish_reason and
error (a bad row gets its reason there; the others complete). One engine per actor of the pool;
Ray Data shows its progress as it goes. On a cluster the same code reads and writes cloud
storage (`s3://...`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray

from llama3_dist import SamplingParams
from llama3_dist.ray_data import build_processor


def sample_prompts(path: Path, rows: int) -> None:
    topics = ["rivers", "clocks", "harbors", "lanterns", "mountains", "bridges", "orchards", "songs"]
    lines = [{"id": i, "prompt": f"A short note about {topics[i % len(topics)]}:"} for i in range(rows)]
    lines.append({"id": rows, "messages": [{"role": "user", "content": "Say hello."}]})
    lines.append({"id": rows + 1, "prompt": "Tell a story", "sampling_params": {"temperature": 0.8, "seed": 1}})
    lines.append({"id": rows + 2, "prompt": "", "note": "a bad row: it gets an error, the rest complete"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the embedded one)")
    parser.add_argument("--input", type=Path, default=None, help="JSONL of prompts (default: a sample written here)")
    parser.add_argument(
        "--output", type=Path, default=None, help="directory for the JSONL results (default: a temp dir)"
    )
    parser.add_argument("--devices", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1, help="actors, one engine each")
    parser.add_argument("--rows", type=int, default=32, help="rows of the sample input")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="llama3-dist-data-"))
    source = args.input or workdir / "prompts.jsonl"
    if args.input is None:
        sample_prompts(source, args.rows)
    target = args.output or workdir / "results"

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False)
    processor = build_processor(
        args.model,
        tensor_parallel_size=args.tensor_parallel_size,
        devices=args.devices,
        concurrency=args.concurrency,
        batch_size=16,
        sampling_params=SamplingParams(temperature=0, max_tokens=args.max_tokens),
    )
    processor(ray.data.read_json(str(source))).write_json(str(target))

    results = [json.loads(line) for f in sorted(target.glob("*.json*")) for line in f.read_text().splitlines()]
    results.sort(key=lambda row: row.get("id", 0))
    for row in results[:2] + results[-3:]:
        what = row.get("prompt") or row.get("messages")
        outcome = f"error: {row['error']}" if row["error"] else f"{row['generated_text']!r} [{row['finish_reason']}]"
        print(f"{row.get('id')!s:>3} {what!r} -> {outcome}")
    tokens = sum(row["num_generated_tokens"] for row in results)
    errors = sum(row["error"] is not None for row in results)
    print(f"{len(results)} rows from {source} to {target}: {tokens} tokens generated, {errors} with an error")


if __name__ == "__main__":
    main()
