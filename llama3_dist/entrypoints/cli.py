"""The `llama3-dist` command: `generate`, `serve` and `bench` subcommands.

Each subcommand registers its own arguments in an `_add_<name>` function and runs in a `_run_<name>`
function; heavy imports (torch, the engine, the HTTP stack) happen inside the runner, so
`llama3-dist --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys


def _devices(value: str) -> list[str]:
    """'cpu,cpu' or 'cuda:0 cuda:1' -> a list of device names."""
    devices = [d for d in value.replace(",", " ").split() if d]
    if not devices:
        raise argparse.ArgumentTypeError(f"--devices needs at least one device, got {value!r}")
    return devices


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The engine arguments every subcommand that loads a model shares."""
    from ..config import QUANTIZATIONS

    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct when installed, else a small "
        "random Llama 3)",
    )
    p.add_argument(
        "--devices",
        type=_devices,
        default=None,
        help="comma-separated devices, one tensor-parallel rank each: cpu | cpu,cpu | cuda:0,cuda:1 "
        "(default: one device, CUDA if available)",
    )
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="most tokens in one step")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the checkpoint's)")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="KV cache size per device, in bytes")
    p.add_argument("--seed", type=int, default=None, help="seed of the shared sampler (unseeded requests)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    p.add_argument(
        "--quantization",
        default=None,
        choices=[q for q in QUANTIZATIONS if q is not None],
        help="quantization at load: int8 (per output channel), int4 (groups of 32), int4-g128, fp8 (weights "
        "per channel and activations per token in float8; GPUs of compute capability 8.9+ or CPUs) "
        "(default: the weights as stored)",
    )


def _engine_kwargs(args) -> dict:
    return dict(
        devices=args.devices,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_seq_len=args.max_model_len,
        kv_cache_bytes=args.kv_cache_bytes,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        quantization=args.quantization,
    )


# ============================================================================ generate
def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt, streamed to stdout",
        description="Generate from a checkpoint (or the default model) and print the text as it streams.",
    )
    _add_model_args(p)
    p.add_argument("--prompt", default="The capital of France is", help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    import time

    from ..llm import LLM
    from ..sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    with LLM(args.model, show_progress=not args.no_progress, **_engine_kwargs(args)) as llm:
        prompt_ids = llm.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else None
        start, printed, out = time.perf_counter(), 0, None
        print(args.prompt, end="", flush=True)
        for out in llm.generate_stream(None if args.chat else args.prompt, params, prompt_token_ids=prompt_ids):
            text = out.outputs[0].text
            print(text[printed:], end="", flush=True)
            printed = len(text)
        elapsed = time.perf_counter() - start
        assert out is not None  # a request yields at least its final output
        n = len(out.outputs[0].token_ids)
        print(
            f"\n[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tokens/s, finish: {out.outputs[0].finish_reason}]",
            file=sys.stderr,
        )
    return 0


# ============================================================================ serve
def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server",
        description="Serve a checkpoint over the OpenAI API (/v1/completions, /v1/chat/completions, "
        "/v1/embeddings, /v1/models, /tokenize, /detokenize, /health, /metrics).",
    )
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port; the URL is printed)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LLAMA3_DIST_API_KEY, which keeps the "
        "key out of process listings); /health, /ping and /metrics stay open for probes and scrapers",
    )
    p.add_argument("--protect-metrics", action="store_true", help="/metrics needs the API key too")
    p.add_argument(
        "--tool-call-parser",
        choices=["auto", "llama3_json", "hermes", "none"],
        default="auto",
        help="how tool calls are found in the output: llama3_json (Llama 3.1+), hermes (<tool_call>: Hermes, "
        "Qwen 2.5), none (never parsed); auto (default) reads the chat template",
    )
    limits = p.add_argument_group("limits", "What one request may ask; past a limit it gets an OpenAI-format error.")
    limits.add_argument("--max-prompt-tokens", type=int, default=None, help="400 beyond (default: the context)")
    limits.add_argument("--max-tokens-cap", type=int, default=None, help="largest max_tokens (default: the context)")
    limits.add_argument("--max-n", type=int, default=16, help="most choices per request (default 16)")
    limits.add_argument("--max-logprobs", type=int, default=20, help="most logprobs per token (default 20)")
    limits.add_argument("--max-body-bytes", type=int, default=4 << 20, help="413 beyond (default 4 MiB)")
    limits.add_argument(
        "--max-active-requests",
        type=int,
        default=1024,
        help="requests running or queued; 429 with Retry-After beyond (default 1024)",
    )
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds before a request is aborted and its KV blocks freed (408; default 600; 0: none)",
    )
    limits.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM or Ctrl-C, seconds the requests under way get to finish (default 30)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: MODEL_DIR as given, or 'llama3-dist-default')",
    )
    p.add_argument("--log-level", default="info", help="uvicorn log level")
    ray_serve = p.add_argument_group(
        "Ray Serve",
        "With --num-replicas the model is served by Ray Serve: N engine replicas, each "
        "tensor-parallel over --devices (kinds only: cpu,cpu or cuda,cuda; Ray picks the devices), "
        "behind one OpenAI endpoint (llama3_dist.ray_serve).",
    )
    ray_serve.add_argument(
        "--num-replicas", type=int, default=None, help="engine replicas (default: one engine, no Ray Serve)"
    )
    ray_serve.add_argument(
        "--routing",
        default=None,
        choices=("prefix", "round_robin", "power_of_two"),
        help="how requests pick a replica (default prefix: the replica holding the prompt's prefix, load as tie-break)",
    )
    ray_serve.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join: auto | HOST:PORT (default $RAY_ADDRESS, else a private Ray)",
    )
    p.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    import os

    api_key = args.api_key or os.environ.get("LLAMA3_DIST_API_KEY")
    if args.num_replicas is not None:
        return _run_serve_replicas(args, api_key)
    if args.routing is not None or args.address is not None:
        raise SystemExit("llama3-dist serve: --routing and --address go with --num-replicas (Ray Serve)")
    from .openai_server import ServerLimits, serve

    try:
        limits = ServerLimits(
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens_cap,
            max_n=args.max_n,
            max_logprobs=args.max_logprobs,
            max_body_bytes=args.max_body_bytes,
            max_active_requests=args.max_active_requests,
            request_timeout_s=args.request_timeout or None,
        )
    except ValueError as e:
        raise SystemExit(f"llama3-dist serve: {e}") from None
    serve(
        args.model,
        engine_kwargs=_engine_kwargs(args),
        host=args.host,
        port=args.port,
        api_key=api_key,
        served_model_name=args.served_model_name,
        log_level=args.log_level,
        protect_metrics=args.protect_metrics,
        limits=limits,
        drain_timeout_s=args.drain_timeout,
        tool_call_parser=args.tool_call_parser,
    )
    return 0


def _run_serve_replicas(args, api_key: str | None) -> int:
    """--num-replicas: the same routes on Ray Serve, one tensor-parallel engine per replica."""
    devices = args.devices or [None]
    kinds = {d.split(":")[0] if d else None for d in devices}
    if len(kinds) != 1 or any(d and ":" in d for d in devices):
        raise SystemExit(
            f"llama3-dist serve: with --num-replicas, --devices names one kind per rank (cpu,cpu or cuda,cuda) "
            f"and Ray picks the devices of each replica; got {','.join(d for d in devices if d)}"
        )
    from ..ray_serve import run_openai_app

    engine_kwargs = _engine_kwargs(args)
    del engine_kwargs["devices"]
    run_openai_app(
        args.model,
        host=args.host,
        port=args.port,
        address=args.address,
        tensor_parallel_size=len(devices),
        devices=kinds.pop(),
        num_replicas=args.num_replicas,
        routing=args.routing or "prefix",
        api_key=api_key,
        served_model_name=args.served_model_name,
        tool_call_parser=args.tool_call_parser,
        **engine_kwargs,
    )
    return 0


# ============================================================================ bench
def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="load-test a server with concurrent streaming clients",
        description="Drive an OpenAI-compatible server with concurrent streaming completions and "
        "report requests/s, output tokens/s, time to first token and inter-token "
        "latency. Without --base-url it starts `llama3-dist serve` for MODEL_DIR on a "
        "free local port and stops it afterwards.",
    )
    _add_model_args(p)
    p.add_argument("--base-url", default=None, help="a running server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, help="bearer token for the server")
    p.add_argument("--served-model-name", default=None, help="the model name to send (default: the server's first)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests in all")
    p.add_argument("--concurrency", type=int, default=16, help="clients streaming at once")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per request (ignore_eos)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(run=_run_bench)


def _run_bench(args) -> int:
    import json

    from .bench import BenchConfig, format_bench, run_bench

    cfg = BenchConfig(
        num_prompts=args.num_prompts,
        concurrency=args.concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        api_key=args.api_key,
        model=args.served_model_name,
    )
    result = run_bench(cfg, base_url=args.base_url, model_dir=args.model, engine_kwargs=_engine_kwargs(args))
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


# ============================================================================ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama3-dist", description="Tensor-parallel inference for Llama 3 family checkpoints."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_generate, _add_serve, _add_bench):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
