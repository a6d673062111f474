"""Decode latency and batch throughput of llama3-dist against transformers, side by side.

On a small-Llama-3-shaped checkpoint (hidden 1024, 16 layers, 16 heads, 4 KV heads,
intermediate 3584, vocabulary 32000: about 284M parameters), in one run:

1. decode at batch 1 (bfloat16): ms per token, ours vs transformers' generate;
2. 64 requests, prompts of 16..512 tokens, outputs of 32..256 tokens: output tokens per second,
   ours (continuous batching) vs transformers' generate in padded batches of 8;
3. the same 64 requests at TP=2 over gloo (--tp2), and the engine's own overhead per step.

    python benchmarks/throughput.py [--quick] [--tp2] [--decode-only] [--skip-hf] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("LLAMA3_DIST_BENCH_DIR", Path.home() / ".cache" / "llama3-dist" / "bench-284m"))
SHAPE = dict(
    hidden_size=1024,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=4,
    intermediate_size=3584,
    vocab_size=32000,
    max_position_embeddings=4096,
    rope_theta=500000.0,
)


def checkpoint() -> str:
    if not (CACHE / "model.safetensors").is_file():
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16).save_pretrained(CACHE)
    return str(CACHE)


def workload(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(16, 513, (n,), generator=g).tolist()
    output_lens = torch.randint(32, 257, (n,), generator=g).tolist()
    prompts = [torch.randint(3, SHAPE["vocab_size"], (p,), generator=g).tolist() for p in prompt_lens]
    return prompts, output_lens


def hf_model(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # run every request to its length, as ours does
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def hf_decode_ms(model, prompt: list[int], new_tokens: int) -> float:
    ids = torch.tensor([prompt], device=model.device)
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (time.perf_counter() - start - prefill) / (new_tokens - 1) * 1000


def ours_decode_ms(llm, prompt: list[int], new_tokens: int) -> float:
    """Time between streamed tokens: one decode step each, after the prefill."""
    from llama3_dist import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate(
        prompt_token_ids=[prompt], sampling_params=params.model_copy(update={"max_tokens": 4}), use_tqdm=False
    )  # warm-up
    stamps = [time.perf_counter() for _ in llm.generate_stream(prompt_token_ids=prompt, sampling_params=params)]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000


_FIRST_TOKENS = itertools.count(1000)  # a first token per prompt ours_prompt_ms makes


def ours_prompt_ms(llm, prompt_tokens: int) -> float:
    """A prompt of prompt_tokens through the engine to its first output token (the time to first
    token of one request: llama-bench's pp test counts the prompt's forward alone), as ms per
    prompt token, the best of 3. Every prompt starts with a token id of its own, so that the
    prefix cache never serves one."""
    from llama3_dist import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times = []
    for _ in range(4):  # the first warms up
        prompt = [next(_FIRST_TOKENS)] + [100 + i for i in range(prompt_tokens - 1)]
        start = time.perf_counter()
        llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    return min(times[1:]) * 1000 / prompt_tokens


@torch.inference_mode()
def hf_batch_tokens_per_s(model, prompts, output_lens, batch: int = 8) -> float:
    """Padded (left) batches of `batch`; each batch runs to its longest output; only the
    requested tokens count."""
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ps, outs = prompts[i : i + batch], output_lens[i : i + batch]
        width = max(len(p) for p in ps)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in ps], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps], device=model.device)
        model.generate(ids, attention_mask=mask, max_new_tokens=max(outs), min_new_tokens=max(outs), do_sample=False)
    return sum(output_lens) / (time.perf_counter() - start)


def ours_batch(llm, prompts, output_lens) -> tuple[float, dict]:
    from llama3_dist import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in output_lens]
    t0 = _times(llm)
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outs] == output_lens
    t1 = _times(llm)
    d = {k: t1[k] - t0[k] for k in t0}
    return sum(output_lens) / elapsed, d


def _times(llm) -> dict:
    t = llm.engine.times
    return dict(steps=t.steps, step=t.step, execute=t.execute, forward=t.forward, sample=t.sample)


def overhead_line(d: dict) -> str:
    n = max(d["steps"], 1)
    ms = lambda x: x / n * 1000  # noqa: E731
    return (
        f"per step ({n} steps): total {ms(d['step']):.2f} ms, forward {ms(d['forward']):.2f} ms; overhead "
        f"{ms(d['step'] - d['forward']):.2f} ms = driver {ms(d['step'] - d['execute']):.2f} + transport "
        f"{ms(d['execute'] - d['forward'] - d['sample']):.2f} + sampling {ms(d['sample']):.2f}"
    )


def _fmt(runs: list[float]) -> str:
    return ", ".join(f"{r:.1f}" for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (TP=2 runs on cpu,cpu or cuda:0,cuda:1)")
    parser.add_argument("--quick", action="store_true", help="16 requests and 32 decode tokens instead of 64 and 128")
    parser.add_argument("--tp2", action="store_true", help="also run the batch benchmark at TP=2 (gloo)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--decode-only", action="store_true", help="only the batch-1 decode comparison")
    args = parser.parse_args()
    from llama3_dist import LLM

    path = checkpoint()
    dtype = getattr(torch, args.dtype)
    n_req, n_tok = (16, 32) if args.quick else (64, 128)
    prompts, output_lens = workload(n_req)
    decode_prompt = prompts[0][:32]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"checkpoint {path} ({args.dtype}) on {where}")

    with LLM(
        path,
        dtype=args.dtype,
        devices=[args.device],
        show_progress=False,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        kv_cache_bytes=1 << 30,
    ) as llm:
        # Decode speed follows the machine's memory bandwidth, which a shared host makes drift:
        # ours and transformers alternate, and each reports its median.
        model = None if args.skip_hf else hf_model(path, dtype, args.device)
        ours_runs, hf_runs = [], []
        for _ in range(5):
            ours_runs.append(ours_decode_ms(llm, decode_prompt, n_tok))
            if model is not None:
                hf_runs.append(hf_decode_ms(model, decode_prompt, n_tok))
        ours_ms = statistics.median(ours_runs)
        print(f"[ours TP=1] decode batch 1: {ours_ms:.1f} ms/token (runs {_fmt(ours_runs)})")
        if model is not None:
            hf_ms = statistics.median(hf_runs)
            print(f"[transformers] decode batch 1: {hf_ms:.1f} ms/token (runs {_fmt(hf_runs)})")
            print(f"RATIO decode speed (ours/transformers): {hf_ms / ours_ms:.2f}x   (target >= 1.7x)")
        if args.decode_only:
            return
        ours_tps, d = ours_batch(llm, prompts, output_lens)
    print(f"[ours TP=1] {n_req} requests: {ours_tps:.1f} output tokens/s")
    print(f"[ours TP=1] {overhead_line(d)}")
    if model is not None:
        hf_tps = hf_batch_tokens_per_s(model, prompts, output_lens)
        del model
        print(f"[transformers] {n_req} requests (padded batches of 8): {hf_tps:.1f} output tokens/s")
        print(f"RATIO batch throughput (ours/transformers): {ours_tps / hf_tps:.2f}x   (target >= 3x)")
    if args.tp2:
        tp2 = ["cpu", "cpu"] if args.device == "cpu" else ["cuda:0", "cuda:1"]
        with LLM(
            path,
            dtype=args.dtype,
            devices=tp2,
            show_progress=False,
            max_num_seqs=64,
            max_num_batched_tokens=2048,
            kv_cache_bytes=1 << 30,
        ) as llm:
            tp_ms = ours_decode_ms(llm, decode_prompt, n_tok)
            tp_tps, d = ours_batch(llm, prompts, output_lens)
        print(f"[ours TP=2] decode batch 1: {tp_ms:.1f} ms/token; {n_req} requests: {tp_tps:.1f} output tokens/s")
        print(f"[ours TP=2] {overhead_line(d)}")


if __name__ == "__main__":
    main()
