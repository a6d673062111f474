"""Weight-only int8 on the CPU: batch-1 decode of the 284M benchmark model (throughput.py's) in
bfloat16 with dense weights and with quantization="int8", alternating runs, against each one's
floor (the bytes read per token / the streaming-read speed measured in the same run).

    python benchmarks/quantization.py [--tokens 64] [--rounds 5]

Dense bfloat16 runs our compiled GEMV with fused decode-layer halves; int8 runs the same GEMV
over int8 rows (a float32 scale per row) through the per-kernel path (the fused halves read
dense weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import checkpoint

from llama3_dist import LLM, SamplingParams


def streaming_gbps() -> float:
    x = torch.ones(128 << 20)  # 512 MiB of float32
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def weight_bytes_per_token(llm: LLM) -> int:
    """Bytes a decode step reads: every parameter of the layers, the final norm and the LM head."""
    model = llm.engine.executor.worker.model
    layers = sum(p.numel() * p.element_size() for p in model.layers.parameters())
    scales = sum(
        m.weight_scale.numel() * m.weight_scale.element_size()
        for m in model.modules()
        if getattr(m, "weight_scale", None) is not None
    )
    head = model.lm_head.weight
    return layers + scales + head.numel() * head.element_size() + model.norm.weight.numel() * 2


def ms_per_token(llm: LLM, tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate(prompt_token_ids=[[1, 2, 3, 4]], sampling_params=params, use_tqdm=False)[0]
    return (time.perf_counter() - start) / len(out.outputs[0].token_ids) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    path = checkpoint()
    capability, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    print(f"torch {torch.__version__}, capability {capability}, {threads} threads")
    engines = {
        "bfloat16": LLM(path, dtype="bfloat16", show_progress=False, max_num_seqs=4),
        "bfloat16 + int8": LLM(path, dtype="bfloat16", quantization="int8", show_progress=False, max_num_seqs=4),
    }
    times: dict[str, list[float]] = {name: [] for name in engines}
    speeds = []
    try:
        for llm in engines.values():
            ms_per_token(llm, 8)  # warm up
        for _ in range(args.rounds):
            speeds.append(streaming_gbps())
            for name, llm in engines.items():
                times[name].append(ms_per_token(llm, args.tokens))
        gbps = max(speeds)
        print(f"streaming read: {gbps:.1f} GB/s (best of {len(speeds)} rounds; {min(speeds):.1f} worst)")
        result = {}
        for name, llm in engines.items():
            bytes_ = weight_bytes_per_token(llm)
            median = statistics.median(times[name])
            floor = bytes_ / (gbps * 1e9) * 1e3
            result[name] = median
            print(
                f"{name:16s} {median:7.2f} ms/token (runs {', '.join(f'{t:.1f}' for t in times[name])}); "
                f"{bytes_ / 1e6:6.1f} MB/token, floor {floor:5.2f} ms, x{median / floor:.2f} the floor"
            )
        print(f"int8 / dense bfloat16: x{result['bfloat16 + int8'] / result['bfloat16']:.2f} ms/token")
    finally:
        for llm in engines.values():
            llm.shutdown()


if __name__ == "__main__":
    main()
