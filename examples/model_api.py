"""The MAX-style model API by hand: prepare inputs, execute, sample, prepare the next inputs.

With no --model it builds a small random Llama 3 checkpoint with transformers first, so it runs
on a fresh machine with no downloads.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from llama3_dist import Llama3Model, ReturnLogits, TextContext


def build_random_checkpoint(path: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=768,
        num_hidden_layers=4,
        vocab_size=1024,
        max_position_embeddings=2048,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        rope_theta=500000.0,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="checkpoint directory (default: a small random Llama 3)")
    parser.add_argument("--devices", default="cpu", help="comma-separated, e.g. cpu,cpu or cuda:0,cuda:1")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_random_checkpoint(tmp)
        with Llama3Model.from_pretrained(
            path, devices=args.devices.split(","), dtype=args.dtype, return_logits=ReturnLogits.LAST_TOKEN
        ) as model:
            ctxs = [TextContext(tokens=[1, 2, 3, 4, 5]), TextContext(tokens=[7, 8, 9])]
            inputs = model.prepare_initial_token_inputs(ctxs)
            out = model.execute(inputs)
            start = time.perf_counter()
            for _ in range(args.steps):
                next_tokens = out.next_token_logits.argmax(-1)  # greedy sampling
                inputs = model.prepare_next_token_inputs(next_tokens, inputs)
                out = model.execute(inputs)
            elapsed = time.perf_counter() - start
            lp = model.compute_log_probabilities(
                inputs, out, out.next_token_logits.argmax(-1), batch_top_n=[3, 3], batch_echo=[False, False]
            )
            for ctx, p in zip(ctxs, lp):
                print(f"{ctx.request_id[:8]}: {ctx.tokens}  top-3 next: {p.top_log_probabilities[0]}")
            print(
                f"{args.steps} decode steps of batch {len(ctxs)} in {elapsed * 1000:.1f} ms "
                f"({elapsed / args.steps * 1000:.2f} ms/step) on {model.config.devices}"
            )
            for ctx in ctxs:
                model.release(ctx)


if __name__ == "__main__":
    main()
