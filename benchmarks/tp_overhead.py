"""Per-step overhead of the Ray executor's step fan-out: Ray Compiled Graph against plain actor calls.

Two measurements, both at TP=2 on CPU ranks (gloo):
  1. fan-out alone: a decode-sized StepInput sent to two no-op actors that return a [B, V] logits
     array from rank 0 only (plain calls with the step inline, plain calls with one ray.put, and a
     compiled graph);
  2. end to end: decode steps of a small random Llama through Llama3Model, in-process (TP=1) and
     through the RayExecutor at TP=2 with and without the compiled graph. The difference between
     the two TP=2 rows is the fan-out alone; TP=2 against TP=1 adds the collectives (on a model
     this small they cost more than the halved matmuls save).

    python benchmarks/tp_overhead.py [--steps 200] [--batch 8] [--address ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import ray
import torch


def decode_step(batch: int, vocab: int):
    from llama3_dist.core.step_input import StepInput

    pages = 4
    return StepInput(
        tokens=np.arange(batch, dtype=np.int64) % vocab,
        positions=np.full(batch, 40, dtype=np.int64),
        query_start_loc=np.arange(batch + 1, dtype=np.int32),
        context_lens=np.full(batch, 41, dtype=np.int32),
        block_tables=np.arange(batch * pages, dtype=np.int32).reshape(batch, pages),
        slot_mapping=np.arange(batch, dtype=np.int64) * 64 + 40,
        logit_rows=np.arange(batch, dtype=np.int64),
    )


def timed(fn, steps: int, warmup: int = 10) -> tuple[float, float]:
    """Median and p90 of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def fanout_only(steps: int, batch: int, vocab: int) -> dict[str, tuple[float, float]]:
    from ray.dag import InputNode, MultiOutputNode

    @ray.remote(num_cpus=0.5)
    class Rank:
        def __init__(self, rank: int):
            self.rank = rank
            self.logits = torch.zeros(batch, vocab)

        def execute(self, step):
            return self.logits if self.rank == 0 else None

    ranks = [Rank.remote(r) for r in range(2)]
    step = decode_step(batch, vocab)
    results = {"plain calls, step inline": timed(lambda: ray.get([a.execute.remote(step) for a in ranks]), steps)}

    def put_once():
        ref = ray.put(step)
        return ray.get([a.execute.remote(ref) for a in ranks])

    results["plain calls, one ray.put"] = timed(put_once, steps)
    with InputNode() as inp:
        dag = MultiOutputNode([a.execute.bind(inp) for a in ranks])
    graph = dag.experimental_compile()
    results["compiled graph"] = timed(lambda: ray.get(graph.execute(step), timeout=-1), steps)
    graph.teardown()
    for a in ranks:
        ray.kill(a)
    return results


def end_to_end(steps: int, batch: int, hidden: int, layers: int) -> dict[str, tuple[float, float]]:
    import transformers

    from llama3_dist import Llama3Model, TextContext

    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_hidden_layers=layers,
        vocab_size=4096,
        max_position_embeddings=4096,
    )
    results = {}
    with tempfile.TemporaryDirectory() as path:
        transformers.LlamaForCausalLM(config).save_pretrained(path)
        # One torch thread in-process, like each rank (cpus_per_rank 0.5 -> 1 thread): on a busy
        # 2-core machine two threads per process oversubscribe the cores and run several times slower.
        threads = torch.get_num_threads()
        for name, kwargs in (
            ("TP=1 in-process, 1 thread", dict(devices=["cpu"])),
            ("TP=2 compiled graph", dict(devices=["cpu"] * 2, compiled_graph=True)),
            ("TP=2 plain calls", dict(devices=["cpu"] * 2, compiled_graph=False)),
        ):
            torch.set_num_threads(1 if name.startswith("TP=1") else threads)
            with Llama3Model.from_pretrained(
                path, dtype="float32", num_kv_blocks=batch * (steps // 16 + 8), block_size=16, **kwargs
            ) as model:
                ctxs = [TextContext(tokens=[1 + b, 2, 3, 4]) for b in range(batch)]
                state = {"inputs": model.prepare_initial_token_inputs(ctxs)}
                state["out"] = model.execute(state["inputs"])

                def step(state=state, model=model):  # bound now: run within this iteration
                    tokens = state["out"].next_token_logits.argmax(-1)
                    state["inputs"] = model.prepare_next_token_inputs(tokens, state["inputs"])
                    state["out"] = model.execute(state["inputs"])

                results[name] = timed(step, steps)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096, help="logits columns returned by rank 0 (fan-out only)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: start a local one)")
    args = parser.parse_args()
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=256 << 20)
    try:
        print(
            f"fan-out alone: 2 ranks, decode step of batch {args.batch}, rank 0 returns [{args.batch}, "
            f"{args.vocab}] float32 ({args.steps} steps)"
        )
        fan = fanout_only(args.steps, args.batch, args.vocab)
        for name, (med, p90) in fan.items():
            print(f"  {name:28s} median {med:6.2f} ms   p90 {p90:6.2f} ms")
        print(
            f"end to end: Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch} decode "
            f"({args.steps} steps)"
        )
        e2e = end_to_end(args.steps, args.batch, args.hidden, args.layers)
        for name, (med, p90) in e2e.items():
            print(f"  {name:28s} median {med:6.2f} ms   p90 {p90:6.2f} ms")
        saved = e2e["TP=2 plain calls"][0] - e2e["TP=2 compiled graph"][0]
        print(
            f"per-step overhead of the fan-out: compiled graph {fan['compiled graph'][0]:.2f} ms, plain calls "
            f"{fan['plain calls, step inline'][0]:.2f} ms (one ray.put: {fan['plain calls, one ray.put'][0]:.2f} ms);"
            f" end to end the compiled graph saves {saved:.2f} ms per TP=2 step"
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
