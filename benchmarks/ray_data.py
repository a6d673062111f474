"""Ray Data batch inference against LLM.generate on the same rows, the same model, the same CPUs.

    python benchmarks/ray_data.py                     # the embedded default model, 256 rows
    python benchmarks/ray_data.py MODEL_DIR --rows 1024 --max-tokens 64

Both sides generate the same greedy tokens (checked) for the same prompts with the same engine
settings; the reference is one LLM.generate call in this process holding every row at once (the
most the engine can batch), the Ray Data side one actor with one engine and the same CPUs. The
ratio is Ray Data's overhead: actor start-up is reported apart and left out of rows/s.
"""

from __future__ import annotations

import argparse
import os
import time

import ray

from llama3_dist import LLM, SamplingParams
from llama3_dist.ray_data import build_processor

WORDS = ["river", "stone", "lantern", "clock", "harbor", "bridge", "mountain", "wizard", "song", "orchard"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the embedded one)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    prompts = [
        " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(8 + i % 24)) + f" #{i}" for i in range(args.rows)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    engine = dict(dtype=args.dtype, max_num_seqs=args.max_num_seqs)

    import torch

    torch.set_num_threads(args.cpus)
    with LLM(args.model, show_progress=False, **engine) as llm:
        llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        reference = llm.generate(prompts, params, use_tqdm=False)
        reference_s = time.perf_counter() - start
    expected = {i: list(r.outputs[0].token_ids) for i, r in enumerate(reference)}

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
    try:
        processor = build_processor(
            args.model,
            devices="cpu",
            concurrency=1,
            num_cpus=args.cpus,
            batch_size=args.batch_size,
            # enough batches in flight to keep max_num_seqs rows in the engine
            max_concurrent_batches=max(2, -(-args.max_num_seqs // args.batch_size) + 1),
            sampling_params=params,
            **engine,
        )
        rows = [{"id": i, "prompt": p} for i, p in enumerate(prompts)]
        start = time.perf_counter()
        first_block_at, first_block_rows, out = 0.0, 0, []
        for block in processor(ray.data.from_items(rows)).iter_batches(batch_size=None, batch_format="pandas"):
            if not out:
                first_block_at, first_block_rows = time.perf_counter(), len(block)
            out.extend(block.to_dict("records"))
        end = time.perf_counter()
    finally:
        ray.shutdown()
    assert len(out) == len(rows) and all(row["error"] is None for row in out)
    same = sum(row["generated_token_ids"] == expected[row["id"]] for row in out)
    tokens = sum(row["num_generated_tokens"] for row in out)
    # Up to the first block of rows: Ray Data planning, the actor start, the model load and the
    # first rows; after it, rows at the engine's pace.
    steady_rows_per_s = (len(out) - first_block_rows) / (end - first_block_at)
    reference_rows_per_s = args.rows / reference_s
    print(
        f"rows: {args.rows} x {args.max_tokens} tokens, {args.cpus} CPUs, {args.dtype}, "
        f"max_num_seqs {args.max_num_seqs}"
    )
    print(f"LLM.generate   {reference_rows_per_s:8.1f} rows/s  ({reference_s:.1f} s)")
    print(
        f"Ray Data       {steady_rows_per_s:8.1f} rows/s after the first block ({first_block_at - start:.1f} s to it, "
        f"start-up included); {len(out) / (end - start):.1f} rows/s over all {end - start:.1f} s"
    )
    print(
        f"Ray Data / LLM.generate: x{steady_rows_per_s / reference_rows_per_s:.2f} rows/s after start-up, "
        f"x{len(out) / (end - start) / reference_rows_per_s:.2f} with it; {same}/{len(out)} rows identical; "
        f"{tokens} tokens"
    )


if __name__ == "__main__":
    main()
