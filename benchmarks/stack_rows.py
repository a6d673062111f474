"""Steps of more rows than a GEMV tile takes, on the CPU: a short prompt's time to its first token
and a decode step's time at several batch sizes, per weight form, for this checkout and (with
--against) another one, alternating whole runs of each in fresh processes.

    python benchmarks/stack_rows.py [--model PATH] [--modes none,int4] [--prompts 8,9,16,32,48]
        [--batches 8,9,16,32,64] [--rounds 2] [--against DIR]

A prompt's figure is the median over 7 requests of `max_tokens=1` (prefix caching off, so every
prompt runs whole); a batch's is the time of a 48-token run of `batch` sequences of 16-token
prompts less that of a run to the first token, per decode step. --against DIR: a checkout of
another revision (`git worktree add /tmp/base REV`), run with PYTHONPATH=DIR; the ratios are its
times over this checkout's (above 1: this checkout is faster). Each figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(model: str, mode: str, prompts: list[int], batches: list[int]) -> dict[str, float]:
    """ms to the first token per prompt length and ms a decode step per batch size (this process's
    llama3_dist)."""
    from llama3_dist import LLM, SamplingParams

    llm = LLM(
        model,
        dtype="bfloat16",
        quantization=None if mode == "none" else mode,
        show_progress=False,
        enable_prefix_caching=False,
        max_num_seqs=max([4, *batches]),
    )
    out: dict[str, float] = {}
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for length in prompts:
        times = []
        for request in range(7):
            prompt = [1 + (request * 31 + j) % 1000 for j in range(length)]
            start = time.perf_counter()
            llm.generate(prompt_token_ids=[prompt], sampling_params=first, use_tqdm=False)
            times.append(time.perf_counter() - start)
        out[f"prompt {length}"] = statistics.median(times) * 1e3
    for batch in batches:
        rows = [[1 + (i + j) % 1000 for j in range(16)] for i in range(batch)]

        def run(tokens: int, rows=rows) -> float:
            params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
            start = time.perf_counter()
            llm.generate(prompt_token_ids=rows, sampling_params=params, use_tqdm=False)
            return time.perf_counter() - start

        run(2)
        whole, to_first = run(48), run(1)
        out[f"batch {batch}"] = (whole - to_first) / 47 * 1e3
    llm.shutdown()
    return out


def child(args: argparse.Namespace, checkout: Path, mode: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    command = [sys.executable, __file__, "--child", "--model", args.model, "--modes", mode]
    command += ["--prompts", args.prompts, "--batches", args.batches]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True, cwd=checkout)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/peer/smollm2-hf", help="checkpoint directory or .gguf")
    parser.add_argument("--modes", default="none,int4", help="comma-separated quantizations (none: as stored)")
    parser.add_argument("--prompts", default="8,9,16,32,48", help="prompt lengths")
    parser.add_argument("--batches", default="8,9,16,32,64", help="decode batch sizes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--against", type=Path, help="another checkout to set against this one")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    prompts = [int(p) for p in args.prompts.split(",") if p]
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.child:
        print(json.dumps(measure(args.model, args.modes, prompts, batches)))
        return
    checkouts = {"this": HERE.parent, **({"against": args.against.resolve()} if args.against else {})}
    print(f"model {args.model}; {', '.join(f'{k} {v}' for k, v in checkouts.items())}; {args.rounds} rounds")
    for mode in args.modes.split(","):
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
        for _ in range(args.rounds):
            for name, checkout in checkouts.items():
                runs[name].append(child(args, checkout, mode))
        print(f"[{mode}] ms (prompt N: to the first token of an N-token prompt; batch B: a decode step of B sequences)")
        for key in runs["this"][0]:
            figures = {name: statistics.median(r[key] for r in rs) for name, rs in runs.items()}
            line = f"  {key:10s} this {figures['this']:7.1f}"
            if "against" in figures:
                every = ", ".join(f"{r[key]:.1f}" for r in runs["against"])
                ratio = figures["against"] / figures["this"]
                line += f"  against {figures['against']:7.1f} ({every})  x{ratio:.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
