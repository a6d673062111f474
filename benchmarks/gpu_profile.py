"""Where a batch-1 decode step's device time goes, kernel by kernel (torch.profiler).

A Llama-3.1-8B-shaped model with random bfloat16 weights made on the GPU, eager (so that every
kernel is its own launch), a few decode steps at a short context: prints the kernels by total
device time, grouped into GEMMs (the weight reads) and the rest, next to the HBM roofline.

    python benchmarks/gpu_profile.py [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _is_gemm(kernel: str) -> bool:
    """cuBLAS's matrix kernels by name (cuBLASLt on Hopper names them nvjet_*)."""
    name = kernel.lower()
    return any(key in name for key in ("gemm", "gemv", "nvjet", "cutlass", "xmma"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    from gpu_bench import CONFIG_8B, weight_bytes_per_token

    from llama3_dist import Llama3Model, TextContext

    device = "cpu" if args.cpu_smoke else "cuda"
    config = json.loads(CONFIG_8B.read_text())
    if args.cpu_smoke:
        config.update(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            head_dim=32,
        )
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "config.json").write_text(json.dumps(config))
        with Llama3Model.from_pretrained(
            root,
            devices=[device],
            dtype="bfloat16",
            load_format="dummy",
            enforce_eager=True,
            num_kv_blocks=256,
            max_seq_len=2048,
        ) as model:
            inputs = model.prepare_initial_token_inputs([TextContext(tokens=list(range(3, 131)))])
            out = model.execute(inputs)
            for _ in range(3):  # warm-up: Triton compilation, cuBLAS heuristics
                inputs = model.prepare_next_token_inputs(out.next_token_logits.argmax(-1), inputs)
                out = model.execute(inputs)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(args.steps):
                    inputs = model.prepare_next_token_inputs(out.next_token_logits.argmax(-1), inputs)
                    out = model.execute(inputs)
                if device == "cuda":
                    torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for event in prof.events():
        if device == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        time_us = event.device_time_total if device == "cuda" else event.self_cpu_time_total
        totals[event.name] += time_us
        counts[event.name] += 1
    step_us = sum(totals.values()) / args.steps
    gemm_us = sum(t for n, t in totals.items() if _is_gemm(n)) / args.steps
    print(
        f"device time per decode step: {step_us / 1e3:.3f} ms ({len(counts)} kernel names, "
        f"{sum(counts.values()) // args.steps} launches per step); GEMM/GEMV {gemm_us / 1e3:.3f} ms, "
        f"everything else {(step_us - gemm_us) / 1e3:.3f} ms"
    )
    if device == "cuda":
        bytes_ = weight_bytes_per_token(config)
        print(f"weights {bytes_ / 1e9:.2f} GB: GEMMs read them at {bytes_ / (gemm_us * 1e-6) / 1e12:.2f} TB/s")
    for name, total in sorted(totals.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {total / args.steps:9.1f} us/step  {counts[name] // args.steps:4d}x  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
