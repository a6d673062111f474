"""Decode's matrix-vector products on one GPU: the Triton GEMV against the routes past it.

For the projections of a Llama-3.1-8B-shaped model at TP=1 (fused q|k|v, o, fused gate|up, down,
the LM head), with one to four rows of x:

1. correctness: the GEMV (dense bfloat16, int8 per row, 8-bit groups of 32 = GGUF Q8_0, 4-bit
   groups of 32 and 128 with offsets = int4 / Q4_1) against the float32 product of the
   dequantized weight, as a fraction of the product's norm; float8 weights (x rounded to float8
   per row inside the GEMV) against reference.fp8_linear (torch._scaled_mm, the same rounding);
   8- and 4-bit weights also through the Gluon GEMV over 32-bit words (WORDS_SWEEP's tiles);
2. a sweep of the GEMV's tile shapes per bit width at one row, each timed with
   triton.testing.do_bench (L2 flushed before every call), against what larger batches take:
   cuBLAS (dense), one dequantizing pass then cuBLAS (quantized; run 3 of
   benchmarks/results/h200-gpu-*.log measured the Triton GEMM this replaced), and
   torch._scaled_mm (fp8 weights and activations);
3. the decode step's projections as it runs them (32 layers of q|k|v, o, gate|up, down, then the
   head), each weight distinct so nothing stays in L2, replayed as one CUDA graph: ms per token
   and the bandwidth reached, against the bytes / the GPU's peak.

    python benchmarks/gpu_gemv.py [--write-configs best.json] [--quick]

`--write-configs` saves the best tile shapes as LLAMA3_DIST_GEMV_CONFIGS takes them. Runs in
about two minutes on an H200, mostly Triton compiling the sweep's variants.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama3_dist.kernels import reference as ref  # noqa: E402
from llama3_dist.kernels import triton_kernels as tk  # noqa: E402

H, FFN, VOCAB, LAYERS = 4096, 14336, 128256, 32
SHAPES = {"qkv": (6144, H), "o": (H, H), "gate_up": (2 * FFN, H), "down": (H, FFN), "head": (VOCAB, H)}
PER_TOKEN = {"qkv": LAYERS, "o": LAYERS, "gate_up": LAYERS, "down": LAYERS, "head": 1}
PEAK_TBS = {"H200": 4.8, "H100": 3.35}
SWEEP = [(4, 1024), (4, 2048), (8, 512), (8, 1024), (8, 2048), (16, 256), (16, 512), (16, 1024), (32, 256), (32, 512)]


def make(kind: str, n: int, k: int, device: str) -> dict:
    """One weight of `kind` in the kernels' layout, and its bytes."""
    weight = torch.randn(n, k, device=device) * 0.02
    if kind == "bf16":
        w = weight.to(torch.bfloat16)
        return dict(kind=kind, w=w, bytes=w.numel() * 2, dense=w.float())
    if kind in ("int8", "fp8"):  # a scale per row
        values, scale = (ref.quantize_int8 if kind == "int8" else ref.quantize_fp8)(weight)
        return dict(
            kind=kind,
            w=values,
            scale=scale,
            bytes=values.numel() + scale.numel() * 4,
            dense=values.float() * scale[:, None],
        )
    grouped = {
        "q8_0": lambda: ref.quantize_int8_groups(weight, 32),
        "int4": lambda: ref.quantize_int4(weight, 32),
        "int4-g128": lambda: ref.quantize_int4(weight, 128),
    }[kind]()
    packed = tk.pack_grouped(grouped)
    extra = packed.scales.numel() * 2 * (2 if packed.offsets is not None else 1)
    return dict(kind=kind, w=packed, bytes=packed.words.numel() + extra, dense=ref.dequantize(grouped, torch.float32))


def gemv_call(entry: dict, x: torch.Tensor, config=None):
    kind, w = entry["kind"], entry["w"]
    if kind == "bf16":
        return lambda: tk.gemv(x, w, config=config)
    if kind == "int8":
        scales = entry["scale"].reshape(-1, 1)
        return lambda: tk.gemv(x, w, scales=scales, bits=8, config=config)
    if kind == "fp8":  # x rounded to float8 per row inside the GEMV (triton_kernels.fp8_linear's route)
        scales = entry["scale"].reshape(-1, 1)
        return lambda: tk.gemv(x, w, scales=scales, bits=16, config=config, fp8=True)
    return lambda: tk.gemv(
        x, w.words, scales=w.scales, offsets=w.offsets, bits=w.bits, group_size=w.group_size, config=config
    )


def baseline_call(entry: dict, x: torch.Tensor):
    """The route past the GEMV: cuBLAS, one dequantizing pass then cuBLAS, torch._scaled_mm."""
    kind, w = entry["kind"], entry["w"]
    if kind == "bf16":
        return lambda: torch.nn.functional.linear(x, w)
    if kind == "int8":
        return lambda: tk.int8_linear(x, w, entry["scale"], gemv_rows=0)
    if kind == "fp8":
        return lambda: ref.fp8_linear(x, w, entry["scale"])
    return lambda: tk.grouped_linear(x, w, gemv_rows=0)


# the Gluon GEMV over 32-bit words (8- and 4-bit weights): (BLOCK_N, BLOCK_K, warps); each thread
# holds BLOCK_N / (warps * max(1, 1024 / BLOCK_K)) rows of the tile
WORDS_SWEEP = [(4, 1024, 1), (8, 1024, 1), (8, 1024, 2), (8, 512, 1), (16, 1024, 2), (16, 1024, 4), (16, 512, 2),
               (32, 1024, 4)]  # fmt: skip
FAILED: set[tuple] = set()  # (bits, config) that gave a wrong product: never timed, never chosen
BITS = {"int8": 8, "q8_0": 8, "int4": 4, "int4-g128": 4}


def check(device: str) -> int:
    failures = 0
    for kind in ("bf16", "int8", "q8_0", "int4", "int4-g128", "fp8"):
        # each kind's default GEMV, then the words GEMV (8 and 4 bits) in every tile the sweep times,
        # 1 and 3 rows for the kinds it times (int8, int4), 1 for the others (each a compilation)
        words = [None]
        if kind in BITS:
            words += [(bn, bk, warps, 1, tk.GEMV_WORDS) for bn, bk, warps in WORDS_SWEEP]
        for name, (n, k) in [("odd", (70, 1000)), ("down", SHAPES["down"]), ("qkv", SHAPES["qkv"])]:
            entry = make(kind, n, k, device)
            for config in words if name != "qkv" else words[:2]:
                if config is None:
                    row_counts = (1, 2, 3, 4) if name == "odd" else (1, 4)
                else:
                    row_counts = (1, 3) if name == "odd" and kind in ("int8", "int4") else (1,)
                for rows in row_counts:
                    x = torch.randn(rows, k, device=device).to(torch.bfloat16)
                    try:
                        got = gemv_call(entry, x, config)().float()
                    except Exception as e:  # a tile the compiler refuses: reported, left out of the sweep
                        print(f"FAIL  gemv {kind} {name} rows {rows} {config}: {type(e).__name__}: {str(e)[:300]}")
                        failures += 1
                        FAILED.add((BITS.get(kind), config))
                        continue
                    if kind == "fp8":  # W8A8: against the same rounding of x through torch._scaled_mm
                        exact = ref.fp8_linear(x, entry["w"], entry["scale"]).float()
                    else:
                        exact = x.float() @ entry["dense"].T
                    error = ((got - exact).norm() / exact.norm()).item()
                    ok = error < 1e-2 and torch.isfinite(got).all().item()
                    failures += not ok
                    if not ok and config:
                        FAILED.add((BITS[kind], config))
                    if not ok or config is None or rows == 1:
                        print(
                            f"{'PASS' if ok else 'FAIL'}  gemv {kind:9s} {name:5s} [{n}x{k}] rows {rows}"
                            f"{' words ' + str(config[:3]) if config else ''}: "
                            f"error {error:.2e} of the product's norm (tol 1e-2)",
                            flush=True,
                        )
    return failures


def sweep(device: str, quick: bool) -> dict[int, list[int]]:
    from triton.testing import do_bench

    best: dict[int, list[int]] = {}
    peak = next((tbs for key, tbs in PEAK_TBS.items() if key in torch.cuda.get_device_name()), None)
    x = torch.randn(1, FFN, device=device).to(torch.bfloat16)
    for kind, bits in (("bf16", 16), ("int8", 8), ("int4", 4), ("fp8", 0)):
        entries = {name: make(kind, n, k, device) for name, (n, k) in SHAPES.items()}
        total_bytes = sum(entries[name]["bytes"] * PER_TOKEN[name] for name in SHAPES)

        def per_token(make_call, entries=entries) -> tuple[float, dict[str, float]]:
            times = {
                name: do_bench(make_call(e, x[:, : e["dense"].shape[1]]), warmup=5, rep=25)
                for name, e in entries.items()
            }
            return sum(times[name] * PER_TOKEN[name] for name in SHAPES), times

        def line(label: str, ms: float, times: dict[str, float], entries=entries, total=total_bytes, kind=kind) -> str:
            shapes = " ".join(f"{name} {entries[name]['bytes'] / times[name] / 1e6:.0f}" for name in SHAPES)
            of_peak = f", {total / ms / 1e9 / peak:.0%} of peak" if peak else ""
            return (
                f"{kind:5s} {label:26s} {ms:6.3f} ms/token of products ({total / ms / 1e9:.2f} TB/s"
                f"{of_peak}); GB/s by shape: {shapes}"
            )

        label = {"bf16": "cuBLAS", "fp8": "torch._scaled_mm"}.get(kind, "dequantize + cuBLAS")
        try:
            base_ms, base_times = per_token(baseline_call)
            print(line(label, base_ms, base_times), flush=True)
        except Exception as e:
            print(f"{kind:5s} {label} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            base_ms = float("nan")
        results = []
        configs = SWEEP[:3] if quick else SWEEP
        for block_n, block_k in configs:
            if bits == 4 and block_k < 64:
                continue
            config = (block_n, block_k, 4, 3)
            try:
                ms, times = per_token(lambda e, xx, c=config: gemv_call(e, xx, c))
            except Exception as e:  # a tile too large for the registers or shared memory
                print(f"{kind:5s} GEMV {config} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            results.append((ms, config, times))
            print(line(f"GEMV {config}", ms, times), flush=True)
        results.sort(key=lambda r: r[0])
        variants = [  # warps and pipelining around the best tiles
            (c[0], c[1], warps, stages) for _, c, _ in results[:1] for warps, stages in ((8, 3), (4, 1), (4, 4))
        ]
        if bits == 4:  # nibbles joined in registers (x read contiguously) on the three best tiles
            variants += [(c[0], c[1], 4, stages, tk.GEMV_JOIN) for _, c, _ in results[:3] for stages in (1, 3)]
        if bits in (4, 8):  # the Gluon GEMV over 32-bit words, each tile that gave right products
            variants += [(bn, bk, warps, 1, tk.GEMV_WORDS) for bn, bk, warps in WORDS_SWEEP]
            variants = [c for c in variants if (bits, tuple(c)) not in FAILED]
        for config in variants:
            try:
                ms, times = per_token(lambda e, xx, c=config: gemv_call(e, xx, c))
            except Exception as e:
                print(f"{kind:5s} GEMV {config} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            results.append((ms, config, times))
            print(line(f"GEMV {config}", ms, times), flush=True)
        results.sort(key=lambda r: r[0])
        ms, config, times = results[0]
        print(f"BEST {kind}: GEMV {config} {ms:.3f} ms/token of products, {base_ms / ms:.2f}x {label}", flush=True)
        best.setdefault(bits, list(config))  # (bits 0: float8 weights, gemv(fp8=True)'s own tiles)
        for rows in (2, 4):
            xr = torch.randn(rows, FFN, device=device).to(torch.bfloat16)
            g = sum(
                do_bench(gemv_call(e, xr[:, : e["dense"].shape[1]], config), warmup=5, rep=25) * PER_TOKEN[n]
                for n, e in entries.items()
            )
            b = sum(
                do_bench(baseline_call(e, xr[:, : e["dense"].shape[1]]), warmup=5, rep=25) * PER_TOKEN[n]
                for n, e in entries.items()
            )
            print(f"{kind:5s} rows {rows}: GEMV {g:.3f} ms/token of products, {label} {b:.3f}", flush=True)
        del entries
        torch.cuda.empty_cache()
    return best


def decode_chain(device: str, configs: dict[int, list[int]]) -> None:
    """The projections of a whole decode step, each layer's weights distinct, as one CUDA graph."""
    peak = next((tbs for key, tbs in PEAK_TBS.items() if key in torch.cuda.get_device_name()), None)
    for kind in ("bf16", "int8", "int4", "fp8"):
        try:
            chain(kind, device, peak)
        except Exception as e:  # report and go on: the other kinds' figures still count
            print(f"CHAIN {kind} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch.cuda.empty_cache()


def chain(kind: str, device: str, peak: float | None) -> None:
    """One kind's chain: the GEMV, then the route past it."""
    layers = [
        {name: make(kind, *SHAPES[name], device) for name in ("qkv", "o", "gate_up", "down")} for _ in range(LAYERS)
    ]
    head = make(kind, *SHAPES["head"], device)
    total = sum(e["bytes"] for layer in layers for e in layer.values()) + head["bytes"]
    x = torch.randn(1, FFN, device=device).to(torch.bfloat16)
    for label, caller in (("GEMV", gemv_call), ("other", baseline_call)):
        calls = [caller(e, x[:, : e["dense"].shape[1]]) for layer in layers for e in layer.values()]
        calls.append(caller(head, x[:, :H]))
        ms = replay_ms(calls, 20)
        of_peak = f" = {total / ms / 1e9 / peak:.0%} of the {peak} TB/s peak" if peak else ""
        print(
            f"CHAIN {kind:5s} {label:6s}: {LAYERS} layers + head, {total / 1e9:.2f} GB, {ms:.3f} ms/token, "
            f"{total / ms / 1e9:.2f} TB/s{of_peak}",
            flush=True,
        )


def replay_ms(calls: list, replays: int) -> float:
    """Milliseconds a replay of `calls` captured as one CUDA graph takes (each call run once
    before the capture: Triton compiles then, and warms up)."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / replays * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-configs", type=Path)
    parser.add_argument("--quick", action="store_true", help="three tile shapes only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_gemv: no CUDA device", file=sys.stderr)
        return 2
    print(f"gpu_gemv on {torch.cuda.get_device_name()}: torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    failures = check("cuda")
    best = sweep("cuda", args.quick)
    if args.write_configs:
        args.write_configs.write_text(json.dumps({str(bits): config for bits, config in best.items()}))
    print(f"best configs: {json.dumps(best)}", flush=True)
    tk.GEMV_CONFIGS.update({bits: tuple(config) for bits, config in best.items()})
    decode_chain("cuda", best)
    print(f"gpu_gemv: {failures} correctness failures; {time.perf_counter() - started:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
