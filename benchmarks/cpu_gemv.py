"""The CPU library's dense GEMV on real models' projection shapes: this checkout's kernels against
another revision's, alternated in one process.

    python benchmarks/cpu_gemv.py --against REV [--models smollm2,284m,tinyllama-1.1b,llama-3.1-8b]
        [--dtype bfloat16|float32] [--rows 1] [--passes 8]

Builds llama3_dist/kernels/cpu_kernels.cpp as of REV (`git show REV:...`) beside this checkout's,
for the instruction set this host selects. For each model, each of its projections [n, k] (q|k|v
and gate|up fused, as the engine holds them, then o, down and the LM head) gets enough random copies
to stream ~400 MB a pass; the passes alternate the two libraries (the first one first in even
passes, last in odd ones), since this kind of host drifts by 10-20% within minutes. Printed: each
library's GB/s (medians over passes), the median of the per-pass ratios (this checkout's speed /
REV's), and per model the ratio of a whole decoder layer plus head (the per-shape ratios weighted
by REV's time on each shape). Both
libraries' outputs are compared first: a change of walk alone should leave them bit-identical.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

# (n, k) of each projection: q|k|v, o, gate|up, down, LM head
MODELS = {
    "smollm2": [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)],
    "284m": [(1536, 1024), (1024, 1024), (7168, 1024), (1024, 3584), (32000, 1024)],
    "tinyllama-1.1b": [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632), (32000, 2048)],
    "llama-3.1-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)],
}
PASS_BYTES = 400e6


def libraries(against: str):
    """(REV's library, this checkout's), both for this host's instruction set."""
    from llama3_dist.kernels import cpu

    source = Path(cpu.__file__).with_name("cpu_kernels.cpp")
    old_text = subprocess.run(
        ["git", "show", f"{against}:llama3_dist/kernels/cpu_kernels.cpp"],
        cwd=source.parent,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    isa = cpu.selected_isa()
    with tempfile.TemporaryDirectory() as directory:
        old_source = Path(directory) / "cpu_kernels.cpp"
        old_source.write_text(old_text)
        try:
            cpu.SOURCE = old_source
            old = cpu.KernelLibrary(isa)
        finally:
            cpu.SOURCE = source
    return old, cpu.KernelLibrary(isa), isa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the git revision to compare with")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of " + ",".join(MODELS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rows", type=int, default=1, help="rows of x (decode: the batch), 1-8")
    parser.add_argument("--passes", type=int, default=8)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    old, new, isa = libraries(args.against)
    print(
        f"{isa} library, {torch.get_num_threads()} threads, {args.dtype} weights, {args.rows} row(s) of x; "
        f"{args.against} against this checkout, {args.passes} alternated passes of ~{PASS_BYTES / 1e6:.0f} MB",
        flush=True,
    )
    torch.manual_seed(0)
    for model in args.models.split(","):
        old_seconds = new_seconds = 0.0  # one layer plus head, at REV's rate and at it over the ratio
        for n, k in MODELS[model]:
            count = max(1, int(PASS_BYTES // (n * k * dtype.itemsize)))
            weights = [(torch.randn(n, k) * 0.02).to(dtype) for _ in range(count)]
            x = torch.randn(args.rows, k).to(dtype)
            same = torch.equal(old.gemv(x, weights[0], None), new.gemv(x, weights[0], None))
            seconds: dict[str, list[float]] = {"old": [], "new": []}
            for index in range(args.passes):
                order = [("old", old), ("new", new)] if index % 2 == 0 else [("new", new), ("old", old)]
                for name, library in order:
                    start = time.perf_counter()
                    for weight in weights:
                        library.gemv(x, weight, None)
                    seconds[name].append(time.perf_counter() - start)
            total = n * k * dtype.itemsize * count
            rates = {name: total / statistics.median(s) / 1e9 for name, s in seconds.items()}
            ratio = statistics.median(o / m for o, m in zip(seconds["old"], seconds["new"], strict=True))
            old_seconds += n * k * dtype.itemsize / rates["old"]
            new_seconds += n * k * dtype.itemsize / rates["old"] / ratio
            print(
                f"{model} [{n}, {k}] ({n * k * dtype.itemsize / 1e6:.1f} MB): {args.against} {rates['old']:.1f} GB/s, "
                f"this checkout {rates['new']:.1f} GB/s: {ratio:.2f}x; outputs {'bit-identical' if same else 'differ'}",
                flush=True,
            )
            del weights
        layer = old_seconds / new_seconds
        print(f"{model}: a decoder layer plus the head (the ratios weighted by REV's time): {layer:.2f}x")


if __name__ == "__main__":
    main()
