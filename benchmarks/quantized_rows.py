"""Quantized products of many rows on the CPU (batched decode, prompts): the panel GEMV taking
every row in one call against the same GEMV in passes of 8 rows (each pass reading the whole
weight), dequantizing for torch's GEMM, and the dense bfloat16 product, on a model's projection
shapes, in one process.

    python benchmarks/quantized_rows.py [--model smollm2|284m|tinyllama-1.1b|llama-3.1-8b]
        [--modes int4,int8] [--rows 8,16,32,64,128,256] [--rounds 5]

Decode rows take x rounded to int8 blocks ("int8-x"); prompt rows keep x exact ("exact"), the
form grouped_linear picks for each. Each figure is the median over rounds, the candidates
alternated within a round; ratios are against the one-call panel GEMV. The "dense" column is the
unquantized bfloat16 weight through cpu.linear (the engine's dense path: the library's GEMV for
few rows, torch's GEMM, widened to float32 where torch's bfloat16 GEMM is not native). Rows of a
whole layer (q|k|v, o, gate|up, down) and the LM head are summed per row count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llama3_dist.kernels import cpu, reference

MODELS = {  # (n, k): q|k|v, o, gate|up, down; the LM head separately
    "smollm2": ([(960, 576), (576, 576), (3072, 576), (576, 1536)], (49152, 576)),
    "284m": ([(1536, 1024), (1024, 1024), (7168, 1024), (1024, 3584)], (32000, 1024)),
    "tinyllama-1.1b": ([(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)], (32000, 2048)),
    "llama-3.1-8b": ([(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)], (128256, 4096)),
}


def quantized(weight: torch.Tensor, mode: str, head: bool) -> reference.GroupQuantized:
    """The engine's forms: int4 layers in coded groups of 32 with a 6-bit head, int8 in groups of 32."""
    if head:
        return reference.quantize_int6_groups(weight) if mode == "int4" else reference.quantize_int8_groups(weight)
    return reference.quantize_int4(weight, 32) if mode == "int4" else reference.quantize_int8_groups(weight)


def candidates(library: cpu.KernelLibrary, packed: cpu.PackedGroupWeights, dense: torch.Tensor, x: torch.Tensor):
    """name -> a call computing the product, for x's rows."""
    n = packed.shape[0]
    weights = (packed.words.data_ptr(), *packed.scale_pointers())
    scratch = torch.empty_like(dense)
    exact = packed.layout in cpu.EXACT_X_LAYOUTS
    calls = {}
    for form, suffix in [("int8-x", "")] + ([("exact", "_exact")] if exact else []):
        name = f"gemv_{packed.layout}{suffix}"
        calls[f"{form} one call"] = lambda name=name: library._in_passes(
            name, x, n, weights, None, (packed.group_size,), cpu.GEMV_ANY_MAX_ROWS
        )
        calls[f"{form} passes of 8"] = lambda name=name: library._in_passes(
            name, x, n, weights, None, (packed.group_size,), cpu.GEMV_MAX_ROWS
        )
    calls["dequantize + GEMM"] = lambda: cpu.linear(x, library.dequantize_grouped(packed, x.dtype, out=scratch))
    calls["dense bf16"] = lambda: cpu.linear(x, dense, None, library)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--modes", default="int4,int8")
    parser.add_argument("--rows", default="8,16,32,64,128,256")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    library = cpu.library()
    assert library is not None, "the CPU kernel library did not build"
    native = cpu.native_gemm(torch.bfloat16)
    print(
        f"{library.isa} library, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"bfloat16 GEMM {'native' if native else 'widened to float32'}; {args.model}, medians of {args.rounds} rounds"
    )
    torch.manual_seed(0)
    layers, head = MODELS[args.model]
    for mode in args.modes.split(","):
        shapes = [(shape, False) for shape in layers] + [(head, True)]
        weights = []
        for (n, k), is_head in shapes:
            w = torch.randn(n, k) * 0.02
            q = quantized(w, mode, is_head)
            packed = cpu.pack_head(q, library.lanes, True) if is_head else cpu.pack_grouped(q, library.lanes, True)
            weights.append((packed, reference.dequantize(q).to(torch.bfloat16), is_head))
        for rows in [int(r) for r in args.rows.split(",")]:
            totals: dict[str, dict[str, list[float]]] = {"layer": {}, "head": {}}
            for packed, dense, is_head in weights:
                x = torch.randn(rows, packed.shape[1]).to(torch.bfloat16)
                calls = candidates(library, packed, dense, x)
                one, passes = calls["int8-x one call"](), calls["int8-x passes of 8"]()
                assert torch.equal(one, passes), "one call and passes of 8 must be bit-identical"
                seconds: dict[str, list[float]] = {name: [] for name in calls}
                for index in range(args.rounds):
                    order = list(calls.items()) if index % 2 == 0 else list(reversed(calls.items()))
                    for name, call in order:
                        start = time.perf_counter()
                        call()
                        seconds[name].append(time.perf_counter() - start)
                part = totals["head" if is_head else "layer"]
                for name, values in seconds.items():
                    part.setdefault(name, []).append(statistics.median(values))
            for part, by_name in totals.items():
                summed = {name: sum(values) * 1e3 for name, values in by_name.items()}
                base = summed["int8-x one call"]
                figures = ", ".join(f"{name} {ms:.2f} ms ({ms / base:.2f}x)" for name, ms in summed.items())
                print(f"{mode} {part:5s} rows {rows:4d}: {figures}", flush=True)


if __name__ == "__main__":
    main()
