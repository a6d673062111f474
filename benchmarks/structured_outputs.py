"""Structured outputs: what a JSON-schema grammar costs, in one run on one engine.

1. The host (CPU flags, torch, Ray, llguidance versions).
2. Grammar engines on this host with the real Llama 3 tokenizer: llguidance (ours) and, when it
   is installed, xgrammar: tokenizer setup, compiling a typical JSON schema (first and second
   schema), and the per-row mask time over a JSON text (one row, and a 64-row batch).
3. Output tokens/s of 64 concurrent requests under a JSON schema against the same 64 prompts
   unconstrained (same engine, alternating rounds, best of each), and the ratio.
4. Time to first token of one request with a cold grammar (a schema never seen: compiled in
   add_request) and with a cached one.

    python benchmarks/structured_outputs.py [--model DIR] [--rounds 2] [--out FILE]

The default model is the embedded one (a small random Llama 3 with the real tokenizer): its
forward pass is cheap, so the grammar's share of a step is larger than with a real model.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Paris", "Rome", "Oslo", "Lima"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "city", "tags", "active"],
    "additionalProperties": False,
}
SAMPLE = '{"active":true,"age":42,"city":"Rome","name":"Ada Lovelace","tags":["math","poet"]}'
COMPACT = {"whitespace_flexible": False}  # as core/grammar.py compiles JSON
NUM_REQUESTS = 64
MAX_TOKENS = 64


def host_header() -> list[str]:
    import llguidance
    import ray
    import torch

    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("flags")), "")
        wanted = ("avx512f", "avx512bw", "avx512_bf16", "avx2", "fma", "amx_tile")
        flags = " ".join(f for f in wanted if re.search(rf"\b{f}\b", line))
    return [
        f"host: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads",
        f"cpu flags: {flags or 'unknown'}",
        f"torch {torch.__version__}, ray {ray.__version__}, llguidance {llguidance.get_version()}",
    ]


def compare_engines(tokenizer, out: list[str]) -> None:
    import llguidance
    import llguidance.hf
    import llguidance.numpy as llg_np

    ids = tokenizer.encode(SAMPLE, add_special_tokens=False)
    second = {**SCHEMA, "properties": {**SCHEMA["properties"], "zip": {"type": "integer"}}}

    t = time.perf_counter()
    llg_tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
    setup = time.perf_counter() - t
    compile_s = []
    for schema in (SCHEMA, second):
        t = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )
        llguidance.LLMatcher(llg_tok, grammar)
        compile_s.append(time.perf_counter() - t)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults=COMPACT)
    executor = llguidance.LLExecutor(num_threads=2)
    one = _llg_mask_us(llguidance, llg_np, executor, llg_tok, grammar, ids, 1)
    batch = _llg_mask_us(llguidance, llg_np, executor, llg_tok, grammar, ids, 64)
    out.append(
        f"llguidance: tokenizer {setup:.2f} s, compile {compile_s[0] * 1e3:.1f} ms (first) "
        f"{compile_s[1] * 1e3:.1f} ms (second), mask {one:.0f} us/row (1 row), {batch:.0f} us/row (64 rows)"
    )
    try:
        import xgrammar
    except ImportError:
        out.append("xgrammar: not installed (pip install xgrammar to compare)")
        return
    t = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiler = xgrammar.GrammarCompiler(info, max_threads=2)
    setup = time.perf_counter() - t
    compile_s = []
    for schema in (SCHEMA, second):
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        compile_s.append(time.perf_counter() - t)
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    times = []
    for rows in (1, 64):
        matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(rows)]
        mask = xgrammar.allocate_token_bitmask(rows, len(tokenizer))
        t = time.perf_counter()
        for token in ids:
            for i, m in enumerate(matchers):
                m.fill_next_token_bitmask(mask, i)
                m.accept_token(token)
        times.append((time.perf_counter() - t) / (len(ids) * rows) * 1e6)
    out.append(
        f"xgrammar:   tokenizer {setup:.2f} s, compile {compile_s[0] * 1e3:.1f} ms (first) "
        f"{compile_s[1] * 1e3:.1f} ms (second), mask {times[0]:.0f} us/row (1 row), {times[1]:.0f} us/row (64 rows)"
    )


def _llg_mask_us(llguidance, llg_np, executor, llg_tok, grammar: str, ids: list[int], rows: int) -> float:
    matchers = [llguidance.LLMatcher(llg_tok, grammar) for _ in range(rows)]
    mask = llg_np.allocate_token_bitmask(rows, llg_tok.vocab_size)
    t = time.perf_counter()
    for token in ids:
        llg_np.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)
        for m in matchers:
            m.consume_token(token)
    return (time.perf_counter() - t) / (len(ids) * rows) * 1e6


def throughput(llm, prompts: list[str], lengths: list[int] | None) -> tuple[float, list[int], float]:
    """(output tokens/s, tokens per request, seconds) of the requests run together: under the
    JSON schema when lengths is None, else unconstrained with request i stopped at lengths[i]
    tokens, so that both runs compute the same batches."""
    from llama3_dist import SamplingParams
    from llama3_dist.sampling_params import StructuredOutputsParams

    if lengths is None:
        params = [
            SamplingParams(
                temperature=1.0, seed=i, max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(json=SCHEMA)
            )
            for i in range(len(prompts))
        ]
    else:
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(lengths)]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    tokens = [len(o.outputs[0].token_ids) for o in outs]
    if lengths is None:
        valid = sum(1 for o in outs if o.outputs[0].finish_reason == "stop" and _valid(o.outputs[0].text))
        assert valid == len(outs), f"only {valid} of {len(outs)} constrained outputs are complete, valid JSON"
    return sum(tokens) / seconds, tokens, seconds


def _valid(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and set(value) == set(SCHEMA["required"])


def time_to_first_token(engine, schema: dict, rid: str) -> float:
    from llama3_dist import SamplingParams
    from llama3_dist.sampling_params import StructuredOutputsParams

    params = SamplingParams(
        temperature=1.0, seed=2, max_tokens=4, structured_outputs=StructuredOutputsParams(json=schema)
    )
    t = time.perf_counter()
    engine.add_request(rid, "Give me a person as JSON:", params)
    while True:
        outputs = engine.step()
        if any(o.request_id == rid and o.outputs[0].token_ids for o in outputs):
            ttft = time.perf_counter() - t
            break
    engine.abort_request(rid)
    return ttft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory or .gguf (default: the default model)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the report here")
    args = parser.parse_args()

    from llama3_dist import LLM

    out = host_header()
    llm = LLM(args.model, dtype="float32", seed=0, show_progress=False, max_num_seqs=NUM_REQUESTS)
    config = llm.engine.config  # not config.json: the model may be a GGUF file (the default SmolLM2)
    out.append(
        f"model: {llm.engine.model_path} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocabulary {config.vocab_size})"
    )
    print("\n".join(out), flush=True)
    lines: list[str] = []
    compare_engines(llm.engine.tokenizer, lines)

    prompts = [f"Person {i}: give their details as JSON." for i in range(NUM_REQUESTS)]
    lengths = throughput(llm, prompts[:4], None)[1]  # warm-up: the grammar compiled, the buffers sized
    throughput(llm, prompts[:4], lengths)
    plain, schema = (0.0, [], 0.0), (0.0, [], 0.0)
    for _ in range(args.rounds):
        schema = max(schema, throughput(llm, prompts, None))
        plain = max(plain, throughput(llm, prompts, schema[1]))
    lines.append(
        f"{NUM_REQUESTS} concurrent requests (the unconstrained run stops each request at the length of its JSON, "
        f"so both compute the same batches), best of {args.rounds}: JSON schema {schema[0]:.0f} tok/s "
        f"({sum(schema[1])} tokens in {schema[2]:.2f} s, all valid), unconstrained {plain[0]:.0f} tok/s "
        f"({sum(plain[1])} tokens in {plain[2]:.2f} s): constrained / unconstrained = {schema[0] / plain[0]:.0%}"
    )

    engine = llm.engine
    cold = [
        time_to_first_token(engine, {**SCHEMA, "title": f"cold-{i}-{time.time_ns()}"}, f"cold-{i}") for i in range(3)
    ]
    cached = [time_to_first_token(engine, SCHEMA, f"warm-{i}") for i in range(3)]
    lines.append(
        f"time to first token, one request: cold grammar {np.median(cold) * 1e3:.1f} ms, "
        f"cached grammar {np.median(cached) * 1e3:.1f} ms (medians of 3)"
    )
    print("\n".join(lines), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(out + lines) + "\n")


if __name__ == "__main__":
    main()
