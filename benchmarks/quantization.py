"""Weight-only quantization on the CPU: batch-1 decode (the time between streamed tokens after a
16-token prompt) in bfloat16 with dense weights and each quantization mode (int8: per output row;
int4 / int4-g128: groups of 32 / 128 with a scale and offset, each an 8-bit code times a bfloat16
factor per 8 groups), alternating runs, against each one's floor (the bytes read per token / the
streaming-read speed measured in the same run); then the GEMV alone for every instruction set
this host runs (each library build), dense bfloat16 against each quantized form. --batches adds
decode throughput at those batch sizes, each mode against the first.

    python benchmarks/quantization.py [--model PATH] [--modes none,int8,int4,int4-g128,w4a16,...] [--tokens 64]
        [--rounds 5] [--batches 8,16,32,64] [--no-gemv]

Modes w4a16 (groups of 128), w4a16-g32, w8a16 (groups of 32) and w8a8 (int8 with a scale per
row, run weight-only): the model written as a compressed-tensors checkpoint, as llm-compressor
writes its models (once, beside the model), and loaded as stored.

--model: default the 284M benchmark model of throughput.py; a .gguf file also runs as stored
(mode "none": its Q8_0/Q4_0/Q4_1 projections stay quantized). Every mode runs our compiled
library's fused decode (all layers in one call on one rank): dense bfloat16 GEMVs, or the integer
GEMV over the quantized panels.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import checkpoint, ours_decode_ms

from llama3_dist import LLM, SamplingParams


def streaming_gbps() -> float:
    x = torch.ones(128 << 20)  # 512 MiB of float32
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


# Checkpoints written by compressed-tensors (model/packed_int.py's save_compressed), loaded as
# stored (quantization None):
# mode -> (bits, symmetric, group size (None: a scale per row), packing).
PACKED_MODES = {
    "w4a16": (4, True, 128, "pack-quantized"),
    "w4a16-g32": (4, True, 32, "pack-quantized"),
    "w8a16": (8, True, 32, "pack-quantized"),
    "w8a8": (8, True, None, "int-quantized"),  # run weight-only
}


def packed_checkpoint(path, mode: str) -> str:
    """The checkpoint at `path` re-saved as a compressed-tensors pack-quantized checkpoint (once,
    beside it: `<path>-<mode>`)."""
    from llama3_dist.model.packed_int import save_compressed

    target = Path(f"{path}-{mode}")
    if not (target / "config.json").is_file():
        bits, symmetric, group_size, packing = PACKED_MODES[mode]
        save_compressed(path, target, bits, symmetric, group_size, packing=packing, int8_activations=mode == "w8a8")
    return str(target)


def weight_bytes_per_token(llm: LLM) -> int:
    """Bytes a decode step reads: every parameter of the layers, the final norm and the LM head."""
    model = llm.engine.executor.worker.model
    layers = sum(p.numel() * p.element_size() for p in model.layers.parameters())
    scales = sum(
        t.numel() * t.element_size()
        for m in model.modules()
        for t in (
            getattr(m, "weight_scale", None),
            getattr(getattr(m, "grouped", None), "scales", None),
            getattr(getattr(m, "grouped", None), "offsets", None),
            getattr(getattr(m, "grouped", None), "factors", None),
        )
        if t is not None
    )
    head = model.lm_head.weight
    return layers + scales + head.numel() * head.element_size() + model.norm.weight.numel() * 2


def ms_per_token(llm: LLM, tokens: int) -> float:
    """Decode alone: the time between streamed tokens after a 16-token prompt's prefill
    (throughput.py's ours_decode_ms, as llamacpp_peer.py measures)."""
    return ours_decode_ms(llm, list(range(100, 116)), tokens)


def batch_tokens_per_s(llm: LLM, batch: int, tokens: int) -> tuple[float, float]:
    """`batch` sequences decoding `tokens` tokens each side by side: output tokens/s with their
    16-token prompts' prefill included, and of the decode steps alone (the run's time less that
    of a run to the first token: prefill and one step)."""
    prompts = [[1 + (i + j) % 1000 for j in range(16)] for i in range(batch)]

    def seconds(max_tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        return time.perf_counter() - start

    whole, first = seconds(tokens), seconds(1)
    return batch * tokens / whole, batch * (tokens - 1) / max(whole - first, 1e-9)


def batch_table(engines: dict[str, LLM], batches: list[int], tokens: int, rounds: int) -> None:
    """Decode throughput at each batch size, every mode in each round (alternating), medians."""
    print(
        f"\nBatched decode, output tokens/s ({tokens} tokens a sequence; with each 16-token prompt's prefill, "
        f"then [decode steps alone]), median of {rounds} rounds:"
    )
    first = next(iter(engines))
    for batch in batches:
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
        for _ in range(rounds):
            for name, llm in engines.items():
                runs[name].append(batch_tokens_per_s(llm, batch, tokens))
        medians = {name: tuple(statistics.median(r[i] for r in rs) for i in (0, 1)) for name, rs in runs.items()}
        base = medians[first]
        print(
            f"  batch {batch:3d}: "
            + ", ".join(
                f"{name} {tps:6.1f}"
                + ("" if name == first else f" (x{tps / base[0]:.2f})")
                + f" [{decode:6.1f}"
                + ("" if name == first else f" x{decode / base[1]:.2f}")
                + "]"
                for name, (tps, decode) in medians.items()
            )
        )


def gemv_table(rounds: int) -> None:
    """The GEMV alone, one row, for each library this host runs: dense bfloat16 and each
    quantized form of the same weights, best of `rounds` x 100 calls."""
    from llama3_dist.kernels import cpu, reference

    for n, k in [(3584, 1024), (1536, 576)]:
        print(f"\nGEMV alone, {n} x {k}, one row, best of {rounds} x 100 calls, microseconds:")
        torch.manual_seed(0)
        w = torch.randn(n, k) * 0.05
        x = torch.randn(1, k).bfloat16()
        int8_values, int8_scale = reference.quantize_int8(w)
        for isa in cpu.executable_isas():
            library = cpu.library(isa)
            if library is None:
                continue
            calls = {
                "bf16": functools.partial(library.gemv, x, w.bfloat16(), None),
                "int8/row float": functools.partial(library.gemv_int8, x, int8_values, int8_scale, None),
            }
            row_group = -(-k // 32) * 32
            int8_rows = reference.GroupQuantized(int8_values, int8_scale.half()[:, None], None, 8, row_group)
            forms = {"int4/32": reference.quantize_int4(w, 32), "int4/128": reference.quantize_int4(w, 128)}
            for name, form in forms.items():  # the float GEMV (float32 models)
                packed = cpu.pack_grouped(form, library.lanes)
                calls[f"{name} float"] = functools.partial(library.gemv_grouped, x, packed, None)
            if library.integer_dot:  # the integer GEMV (bfloat16 models)
                for name, form in {"int8/row": int8_rows, **forms}.items():
                    packed = cpu.pack_grouped(form, library.lanes, panels=True)
                    calls[f"{name} int"] = functools.partial(library.gemv_grouped, x, packed, None)
            figures = {}
            for name, call in calls.items():
                call()
                best = float("inf")
                for _ in range(rounds):
                    start = time.perf_counter()
                    for _ in range(100):
                        call()
                    best = min(best, (time.perf_counter() - start) / 100)
                figures[name] = best * 1e6
            dense = figures["bf16"]
            print(f"  {isa:8s} " + ", ".join(f"{name} {us:.0f} (x{dense / us:.2f})" for name, us in figures.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory or .gguf (default: the 284M model)")
    parser.add_argument("--modes", default="none,int8,int4,int4-g128", help="comma-separated quantizations")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-gemv", action="store_true", help="leave out the GEMV table")
    parser.add_argument(
        "--batches", default="", help="comma-separated batch sizes for a batched-decode table (default: none)"
    )
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    path = args.model or checkpoint()
    capability, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    print(f"torch {torch.__version__}, capability {capability}, {threads} threads; model {path}")
    engines = {
        mode: LLM(
            packed_checkpoint(path, mode) if mode in PACKED_MODES else path,
            dtype="bfloat16",
            quantization=None if mode == "none" or mode in PACKED_MODES else mode,
            show_progress=False,
            max_num_seqs=max([4, *batches]),
        )
        for mode in args.modes.split(",")
    }
    times: dict[str, list[float]] = {name: [] for name in engines}
    speeds = []
    try:
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
                f"{name:10s} {median:7.2f} ms/token {1e3 / median:6.1f} tok/s (runs "
                f"{', '.join(f'{t:.1f}' for t in times[name])}); {bytes_ / 1e6:6.1f} MB/token, floor "
                f"{floor:5.2f} ms, x{median / floor:.2f} the floor"
            )
        first = next(iter(result))
        for name, median in result.items():
            if name != first:
                print(f"{name} / {first}: x{result[first] / median:.2f} tokens/s")
        if batches:
            batch_table(engines, batches, args.tokens, args.rounds)
    finally:
        for llm in engines.values():
            llm.shutdown()
    if not args.no_gemv:
        gemv_table(args.rounds)


if __name__ == "__main__":
    main()
