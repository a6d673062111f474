"""Decode speed and throughput on one GPU, CUDA graphs against eager, next to the HBM roofline.

Two models with random bfloat16 weights made directly on the GPU (load_format="dummy": no disk,
no download): a Llama-3.1-8B-shaped one (its real config.json, tests/data/configs) and the 284M
benchmark shape of throughput.py. For each, with the engine (LLM, TP=1):

- batch-1 decode: ms/token and tok/s (median of 3 streams of 128 tokens), graphs and eager;
- the HBM roofline: weight bytes read per token / the GPU's peak bandwidth, and the fraction of
  it reached;
- engine overhead per decode step at batch 64 (step time minus the device's forward time:
  scheduling, transport, sampling), graphs and eager;
- offline throughput, graphs only: 256 requests of 512 prompt tokens and 256 output tokens
  (--requests/--prompt/--output change it), output tok/s;
- with --quantizations int8,int4,fp8: batch-1 decode of the model quantized at load, against the
  roofline of its own bytes.

    python benchmarks/gpu_bench.py [--models 8b,284m] [--requests 256] [--quick]
    python benchmarks/gpu_bench.py --cpu-smoke   # tiny shapes on the CPU: checks this script only

Runs in a few minutes on an H100/H200 including start-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG_8B = REPO / "tests" / "data" / "configs" / "meta-llama__Llama-3.1-8B.json"
SHAPE_284M = dict(
    architectures=["LlamaForCausalLM"],
    hidden_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=3584,
    vocab_size=32000,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    torch_dtype="bfloat16",
)
# Peak HBM bandwidth in TB/s by device name (the data sheets'); unknown GPUs use a measured copy.
PEAK_TBS = {"H100 80GB HBM3": 3.35, "H100 SXM": 3.35, "H100 PCIe": 2.0, "H100 NVL": 3.9, "H200": 4.8, "A100": 2.0}
# Published single-H100 serving figures (ShareGPT, different workload: for scale only).
PUBLISHED = "vLLM 12.5k and SGLang 16.2k output tok/s on ShareGPT, Llama-3.1-8B, one H100"


def model_dir(name: str, root: Path, smoke: bool) -> Path:
    config = json.loads(CONFIG_8B.read_text()) if name == "8b" else dict(SHAPE_284M)
    if smoke:  # tiny: the script's logic, not its speed
        config.update(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            head_dim=32,
        )
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


# Bytes a decode step reads per projection weight, by quantization: the values plus their scales
# (int8 / fp8: a float32 per row, a few bytes in thousands, left out; int4: a float16 scale and
# offset per group). The LM head of every quantized model is 8 bits in groups of 32 (Q8_0).
PROJECTION_BYTES = {None: 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5 + 4 / 32, "int4-g128": 0.5 + 4 / 128}
HEAD_BYTES = {None: 2.0, "int8": 1 + 2 / 32, "fp8": 1 + 2 / 32, "int4": 1 + 2 / 32, "int4-g128": 1 + 2 / 32}


def weight_bytes_per_token(config: dict, quantization: str | None = None) -> int:
    """Every weight once per decode step, except the embedding (one row; the LM head reads it
    whole when tied)."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    attention = h * head_dim * (2 * heads + 2 * kv_heads)
    projections = layers * (attention + 3 * h * i) * PROJECTION_BYTES[quantization]
    return int(projections + 2 * (layers * 2 * h + h) + config["vocab_size"] * h * HEAD_BYTES[quantization])


def peak_bandwidth_tbs(device: torch.device) -> tuple[float, str]:
    name = torch.cuda.get_device_name(device)
    for key, tbs in PEAK_TBS.items():
        if key in name:
            return tbs, f"{name}, data-sheet peak {tbs} TB/s"
    buffer = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    out = torch.empty_like(buffer)
    out.copy_(buffer)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(10):
        out.copy_(buffer)
    torch.cuda.synchronize(device)
    tbs = 2 * 10 * buffer.numel() / (time.perf_counter() - start) / 1e12
    return tbs, f"{name}, measured copy {tbs:.2f} TB/s (read + write)"


def decode_ms(llm, prompt: list[int], tokens: int, rounds: int = 3) -> float:
    """Median time between streamed tokens of one request (each one decode step)."""
    from llama3_dist import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=[prompt], sampling_params=params.model_copy(update={"max_tokens": 4}), use_tqdm=False)
    runs = []
    for _ in range(rounds):
        stamps = [time.perf_counter() for _ in llm.generate_stream(prompt_token_ids=prompt, sampling_params=params)]
        runs.append((stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3)
    return statistics.median(runs)


def overhead_ms(llm, batch: int, prompt_len: int, output_len: int) -> tuple[float, float]:
    """(engine step ms, overhead ms) per decode step of `batch` sequences: the step minus the
    device's forward time, averaged over the decode steps of one batch."""
    from llama3_dist import SamplingParams

    prompts = [[(7 * b + j) % 500 + 3 for j in range(prompt_len)] for b in range(batch)]
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)  # warm-up
    times = llm.engine.times
    before = (times.steps, times.step, times.forward)
    llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    steps = times.steps - before[0]
    step_ms = (times.step - before[1]) / steps * 1e3
    return step_ms, step_ms - (times.forward - before[2]) / steps * 1e3


def greedy_probe(llm) -> list[list[int]]:
    """Greedy tokens of 7 requests (decode batches 7 down to 1: several padded buckets)."""
    from llama3_dist import SamplingParams

    prompts = [[(11 * i + j) % 400 + 3 for j in range(5 + 9 * i)] for i in range(7)]
    outs = llm.generate(
        prompt_token_ids=prompts,
        use_tqdm=False,
        sampling_params=[SamplingParams(max_tokens=12 + 4 * i, temperature=0, ignore_eos=True) for i in range(7)],
    )
    return [o.outputs[0].token_ids for o in outs]


def throughput(llm, requests: int, prompt_len: int, output_len: int) -> float:
    from llama3_dist import SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (prompt_len,), generator=g).tolist() for _ in range(requests)]
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(
        prompt_token_ids=prompts[:4], sampling_params=params.model_copy(update={"max_tokens": 8}), use_tqdm=False
    )
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return requests * output_len / elapsed


def open_llm(path: Path, device: str, args, **options):
    """The engine on the model's random weights, bfloat16, with the script's limits."""
    from llama3_dist import LLM

    return LLM(
        str(path),
        load_format="dummy",
        dtype="bfloat16",
        devices=[device],
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_seq_len=args.max_seq_len,
        show_progress=False,
        **options,
    )


MODES = {  # the engine's defaults on one GPU (CUDA graphs, overlapped scheduling), then each off
    "graphs": dict(async_scheduling=True),
    "graphs, no overlap": dict(async_scheduling=False),
    "eager": dict(enforce_eager=True, async_scheduling=True),
    # one-row products through cuBLAS (and quantized ones through the dequantizing pass) instead of the GEMV
    "graphs, no GEMV": dict(async_scheduling=True),
}
MODE_NAMES = {"graphs": "graphs", "no-overlap": "graphs, no overlap", "eager": "eager", "no-gemv": "graphs, no GEMV"}


def bench(name: str, path: Path, device: str, args) -> None:
    import os

    config = json.loads((path / "config.json").read_text())
    results = {}
    modes = {MODE_NAMES[key]: MODES[MODE_NAMES[key]] for key in args.modes.split(",")}
    for mode, options in modes.items():
        started = time.perf_counter()
        os.environ["LLAMA3_DIST_GEMV"] = "0" if "no GEMV" in mode else "1"
        with open_llm(path, device, args, **options) as llm:
            load_s = time.perf_counter() - started
            prompt = list(range(3, 35))
            r = {"load_s": load_s, "decode_ms": decode_ms(llm, prompt, args.decode_tokens)}
            r["step_ms"], r["overhead_ms"] = overhead_ms(llm, args.overhead_batch, 16, args.overhead_steps)
            if mode == "graphs":
                r["tok_s"] = throughput(llm, args.requests, args.prompt, args.output)
            r["probe"] = greedy_probe(llm)
            results[mode] = r
        tail = (
            f"; {args.requests} requests ({args.prompt} in, {args.output} out): {r['tok_s']:.0f} output tok/s"
            if "tok_s" in r
            else ""
        )
        print(
            f"[{name} {mode}] start-up {load_s:.1f} s; batch-1 decode {r['decode_ms']:.2f} ms/token "
            f"({1e3 / r['decode_ms']:.1f} tok/s); batch {args.overhead_batch}: step {r['step_ms']:.2f} ms, "
            f"engine overhead {r['overhead_ms']:.3f} ms" + tail,
            flush=True,
        )
    os.environ["LLAMA3_DIST_GEMV"] = "1"
    for other in [mode for mode in results if mode != "graphs"]:
        same = results["graphs"]["probe"] == results[other]["probe"]
        note = " (other kernels for one-row products: other rounding)" if "no GEMV" in other and not same else ""
        print(
            f"RESULT {name}: greedy tokens of 7 requests (12-36 steps, batches 7..1), graphs vs {other}: "
            f"{'identical' if same else 'DIFFERENT'}{note}",
            flush=True,
        )
    if device.startswith("cuda"):
        tbs, source = peak_bandwidth_tbs(torch.device(device))
        roofline_ms = weight_bytes_per_token(config) / (tbs * 1e12) * 1e3
        graphs = results["graphs"]
        others = ", ".join(
            f"{mode} {roofline_ms / r['decode_ms']:.0%}" for mode, r in results.items() if mode != "graphs"
        )
        print(
            f"RESULT {name}: {weight_bytes_per_token(config) / 1e9:.2f} GB of weights per token; roofline "
            f"{roofline_ms:.2f} ms/token ({1e3 / roofline_ms:.0f} tok/s) on {source}; graphs reach "
            f"{roofline_ms / graphs['decode_ms']:.0%} of it ({1e3 / graphs['decode_ms']:.0f} tok/s); {others}",
            flush=True,
        )
        if name == "8b":
            print(
                f"RESULT 8b offline throughput {graphs['tok_s']:.0f} output tok/s (published for scale: {PUBLISHED})",
                flush=True,
            )


def bench_quantized(name: str, path: Path, device: str, quantization: str, args) -> None:
    """Batch-1 decode and the batch-64 step of the model quantized at load, graphs on, against the
    roofline of its own bytes."""

    config = json.loads((path / "config.json").read_text())
    started = time.perf_counter()
    with open_llm(path, device, args, quantization=quantization) as llm:
        load_s = time.perf_counter() - started
        decode = decode_ms(llm, list(range(3, 35)), args.decode_tokens)
        step, overhead = overhead_ms(llm, args.overhead_batch, 16, args.overhead_steps)
    line = (
        f"[{name} {quantization} graphs] start-up {load_s:.1f} s; batch-1 decode {decode:.2f} ms/token "
        f"({1e3 / decode:.1f} tok/s); batch {args.overhead_batch}: step {step:.2f} ms, "
        f"engine overhead {overhead:.3f} ms"
    )
    if device.startswith("cuda"):
        tbs, source = peak_bandwidth_tbs(torch.device(device))
        weight_bytes = weight_bytes_per_token(config, quantization)
        roofline_ms = weight_bytes / (tbs * 1e12) * 1e3
        line += (
            f"; {weight_bytes / 1e9:.2f} GB of weights per token, roofline {roofline_ms:.2f} ms/token on {source}: "
            f"{roofline_ms / decode:.0%} of it"
        )
    print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="8b,284m")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--output", type=int, default=256)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--overhead-batch", type=int, default=64)
    parser.add_argument("--overhead-steps", type=int, default=32)
    parser.add_argument("--modes", default="graphs,no-overlap,eager,no-gemv", help=f"of {list(MODE_NAMES)}")
    parser.add_argument(
        "--quantizations", default="", help="also these (int8,int4,int4-g128,fp8), batch-1 decode with graphs"
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (this script's logic only)")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.requests, args.prompt, args.output, args.max_num_seqs = 8, 16, 8, 16
        args.decode_tokens, args.overhead_batch, args.overhead_steps, args.max_seq_len = 8, 4, 4, 256
        device = "cpu"
    elif not torch.cuda.is_available():
        print("gpu_bench: no CUDA device; pass --cpu-smoke to check the script on a CPU", file=sys.stderr)
        return 2
    else:
        device = "cuda"
    print(
        f"gpu_bench on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (smoke)'}: torch "
        f"{torch.__version__}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as root:
        for name in args.models.split(","):
            path = model_dir(name, Path(root), args.cpu_smoke)
            bench(name, path, device, args)
            for quantization in filter(None, args.quantizations.split(",")):
                bench_quantized(name, path, device, quantization, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
