"""The offline LLM API: batch generation, sampling parameters, chat and streaming.

    python examples/generate.py                              # the embedded default model, one CPU
    python examples/generate.py /path/to/Llama-3.2-1B-Instruct --devices cuda:0 --dtype bfloat16
    python examples/generate.py --devices cpu,cpu            # tensor parallel over two CPU ranks (Ray)

The embedded default is a small random Llama 3 with the real tokenizer: its text is gibberish,
but every step a real checkpoint takes runs.
"""

from __future__ import annotations

import argparse
import time

from llama3_dist import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: the embedded one)")
    parser.add_argument("--devices", default="cpu", help="comma-separated: cpu | cpu,cpu | cuda:0,cuda:1")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    prompts = ["The capital of France is", "Here is a short poem about the sea:", "def fibonacci(n):"]
    with LLM(args.model, devices=args.devices.split(","), dtype=args.dtype, show_progress=False) as llm:
        # 1. A batch: one SamplingParams for all prompts (or a list, one per prompt).
        sampled = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.max_tokens, seed=0)
        start = time.perf_counter()
        outputs = llm.generate(prompts, sampled, use_tqdm=False)
        elapsed = time.perf_counter() - start
        for out in outputs:
            c = out.outputs[0]
            print(f"{out.prompt!r} -> {c.text!r} ({len(c.token_ids)} tokens, {c.finish_reason})")
        n_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(f"[batch of {len(prompts)}: {n_tokens} tokens in {elapsed:.2f} s, {n_tokens / elapsed:.1f} tokens/s]")

        # 2. Greedy with log-probabilities and a stop string; n=2 samples of one prompt.
        greedy = llm.generate(
            prompts[0], SamplingParams(temperature=0, max_tokens=8, logprobs=2, stop=["\n"]), use_tqdm=False
        )[0].outputs[0]
        first = greedy.logprobs[0]
        print(
            f"greedy: {greedy.text!r}; first token's top-2 log-probabilities: "
            f"{ {lp.decoded_token: round(lp.logprob, 3) for lp in first.values()} }"
        )
        for c in llm.generate(prompts[1], SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=1), use_tqdm=False)[
            0
        ].outputs:
            print(f"sample {c.index}: {c.text!r}")

        # 3. Chat, with the checkpoint's chat template.
        if llm.get_tokenizer() is not None and getattr(llm.get_tokenizer(), "chat_template", None):
            reply = llm.chat(
                [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Name three rivers."},
                ],
                SamplingParams(temperature=0, max_tokens=args.max_tokens),
                use_tqdm=False,
            )[0]
            print(f"chat ({len(reply.prompt_token_ids)} prompt tokens): {reply.outputs[0].text!r}")

        # 4. Streaming: each step yields the cumulative output; print what is new.
        print("stream: ", end="", flush=True)
        printed = 0
        for out in llm.generate_stream("Once upon a time", SamplingParams(temperature=0, max_tokens=args.max_tokens)):
            text = out.outputs[0].text
            print(text[printed:], end="", flush=True)
            printed = len(text)
        print(f"\n[finished: {out.outputs[0].finish_reason}]")


if __name__ == "__main__":
    main()
