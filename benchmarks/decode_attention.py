"""The CPU library's decode attention (one query token per sequence against its paged keys and
values) on a model's head shapes: this checkout's kernels against another revision's, alternated
in one process.

    python benchmarks/decode_attention.py --against REV [--model smollm2|284m|llama-3.1-8b]
        [--shapes 1x1000,1x4000,8x1000,64x116,64x1000] [--passes 5]

Each shape is sequences x cached tokens, the cache's blocks of 16 shuffled (as a server's
sequences, grown a block at a time side by side, hold them). Printed per shape: each library's
time a call (median over passes; which library goes first alternates), ns per cached token and
query head, the key and value bytes read a second, and the ratio (REV's time / this checkout's).
Both libraries' outputs are compared first (a change of prefetching alone leaves them
bit-identical; another summation order moves a few in the last bfloat16 bit).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from cpu_gemv import libraries

MODELS = {  # query heads, KV heads, head dim
    "smollm2": (9, 3, 64),
    "284m": (16, 4, 64),
    "llama-3.1-8b": (32, 8, 128),
}
BLOCK = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the git revision to compare with")
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--shapes", default="1x1000,1x4000,8x1000,64x116,64x1000")
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args()
    old, new, isa = libraries(args.against)
    hq, hk, d = MODELS[args.model]
    print(
        f"{isa} library, {torch.get_num_threads()} threads, bfloat16 cache; {args.model} heads ({hq} query, {hk} KV, "
        f"{d} features); {args.against} against this checkout, {args.passes} alternated passes",
        flush=True,
    )
    torch.manual_seed(0)
    for shape in args.shapes.split(","):
        batch, context = (int(part) for part in shape.split("x"))
        per_sequence = -(-context // BLOCK)
        blocks = batch * per_sequence + 1
        k_cache = torch.randn(blocks, BLOCK, hk, d).to(torch.bfloat16)
        v_cache = torch.randn(blocks, BLOCK, hk, d).to(torch.bfloat16)
        tables = (torch.randperm(blocks - 1) + 1).view(batch, per_sequence).to(torch.int32)
        lengths = torch.full((batch,), context, dtype=torch.int32)
        q = torch.randn(batch, hq, d).to(torch.bfloat16)
        outputs = [lib.paged_decode_attention(q, k_cache, v_cache, tables, lengths, d**-0.5) for lib in (old, new)]
        same = (outputs[0] == outputs[1]).float().mean().item()
        calls = max(3, int(2e8 // (batch * context * hk * d * 4)))  # ~200 MB of keys and values a pass
        seconds: dict[str, list[float]] = {"old": [], "new": []}
        for index in range(args.passes):
            order = [("old", old), ("new", new)] if index % 2 == 0 else [("new", new), ("old", old)]
            for name, library in order:
                start = time.perf_counter()
                for _ in range(calls):
                    library.paged_decode_attention(q, k_cache, v_cache, tables, lengths, d**-0.5)
                seconds[name].append((time.perf_counter() - start) / calls)
        kv_bytes = batch * context * hk * d * 2 * 2
        figures = []
        for name, label in (("old", args.against), ("new", "this checkout")):
            call = statistics.median(seconds[name])
            figures.append(
                f"{label} {call * 1e6:8.1f} us ({call * 1e9 / (batch * context * hq):.2f} ns a token and head, "
                f"{kv_bytes / call / 1e9:.1f} GB/s)"
            )
        ratio = statistics.median(o / n for o, n in zip(seconds["old"], seconds["new"], strict=True))
        print(
            f"{batch:3d} x {context:5d} tokens ({kv_bytes / 1e6:6.1f} MB): {'; '.join(figures)}: {ratio:.2f}x; "
            f"outputs {same:.4f} bit-identical",
            flush=True,
        )


if __name__ == "__main__":
    main()
