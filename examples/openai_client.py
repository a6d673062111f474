"""Talk to `llama3-dist serve` with the official openai client.

    llama3-dist serve --port 8000 &                    # the embedded default model
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

With `serve --api-key KEY`, pass --api-key KEY (or set OPENAI_API_KEY).
"""

from __future__ import annotations

import argparse
import os

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    print(f"model: {model}")

    # Completions; vLLM's extra parameters (top_k, min_p, repetition_penalty, ignore_eos, ...) go in extra_body.
    r = client.completions.create(
        model=model,
        prompt="The capital of France is",
        max_tokens=args.max_tokens,
        temperature=0.7,
        top_p=0.95,
        seed=0,
        extra_body={"top_k": 40},
    )
    print(
        f"completion: {r.choices[0].text!r} [{r.choices[0].finish_reason}; usage {r.usage.prompt_tokens} + "
        f"{r.usage.completion_tokens} = {r.usage.total_tokens}]"
    )

    # Chat, rendered with the checkpoint's chat template.
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three rivers."},
    ]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens, temperature=0)
    print(f"chat: {r.choices[0].message.content!r} [{r.choices[0].finish_reason}; {r.usage.total_tokens} tokens]")

    # Streaming chat: server-sent events, one delta per step.
    print("stream: ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:
            print(f"\n[{chunk.usage.completion_tokens} tokens streamed]")

    # Log-probabilities of the top 2 candidates at each step.
    r = client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=3, temperature=0, logprobs=2)
    for tok, top in zip(r.choices[0].logprobs.tokens, r.choices[0].logprobs.top_logprobs):
        print(f"  {tok!r}: {', '.join(f'{t!r} {lp:.2f}' for t, lp in top.items())}")

    # Errors come back in OpenAI's format and raise the usual exceptions.
    try:
        client.completions.create(model=model, prompt="hi", max_tokens=2, temperature=-1)
    except openai.BadRequestError as e:
        print(f"bad request refused: {e.status_code} {e.body['message']}")


if __name__ == "__main__":
    main()
