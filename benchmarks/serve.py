"""Load-test the OpenAI-compatible server: N concurrent streaming clients; reports requests/s,
output tokens/s, time to first token and inter-token latency (p50, p99).

    python benchmarks/serve.py                                  # starts `llama3-dist serve` (default model)
    python benchmarks/serve.py --devices cpu,cpu --concurrency 16 --num-prompts 64
    python benchmarks/serve.py --base-url http://127.0.0.1:8000/v1   # a server already running

The same code as `llama3-dist bench` (llama3_dist/entrypoints/bench.py: run_bench); every option of that
command works here (--help).
"""

from __future__ import annotations

import sys

from llama3_dist.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
