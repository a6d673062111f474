"""Tensor parallelism on one machine: the same greedy generations at TP=1 and TP=N.

    python examples/tensor_parallel.py                 # N = the GPUs present, else 2 CPU ranks
    python examples/tensor_parallel.py /path/to/ckpt --tp 4

With GPUs the ranks are cuda:0 .. cuda:N-1 (NCCL); without, N CPU ranks that all-reduce over gloo.
Each rank is a Ray actor holding 1/N of the attention heads, of the MLP and of the KV cache (a
local Ray instance is started, or RAY_ADDRESS joined). float32 by default, so the results of the
two runs agree to rounding and greedy decoding picks the same tokens.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from llama3_dist import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Tensor parallelism splits", "A haiku about autumn:", "1, 2, 3, 4,"]


def run(model, devices: list[str], dtype: str, max_tokens: int) -> tuple[list[list[int]], list[str], float]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with LLM(model, devices=devices, dtype=dtype, show_progress=False) as llm:
        llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm up
        start = time.perf_counter()
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    return tokens, [o.outputs[0].text for o in outs], sum(map(len, tokens)) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the embedded one)")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default: #GPUs, else 2)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cpu", action="store_true", help="CPU ranks even where GPUs exist")
    args = parser.parse_args()

    gpus = 0 if args.cpu else torch.cuda.device_count()
    tp = args.tp or (gpus if gpus > 1 else 2)
    devices = [f"cuda:{i}" for i in range(tp)] if gpus >= tp else ["cpu"] * tp
    print(f"TP=1 on {devices[:1]}, TP={tp} on {devices}")

    ref_tokens, _ref_texts, ref_speed = run(args.model, devices[:1], args.dtype, args.max_tokens)
    tp_tokens, tp_texts, tp_speed = run(args.model, devices, args.dtype, args.max_tokens)

    same = 0
    for prompt, a, b, text in zip(PROMPTS, ref_tokens, tp_tokens, tp_texts):
        match = a == b
        same += match
        print(f"{'same' if match else 'DIFFERENT'}  {prompt!r} -> {text!r}")
    print(f"TP=1: {ref_speed:.1f} tokens/s; TP={tp}: {tp_speed:.1f} tokens/s")
    print(f"{same}/{len(PROMPTS)} generations identical at TP=1 and TP={tp}")
    return 0 if same == len(PROMPTS) else 1


if __name__ == "__main__":
    sys.exit(main())
