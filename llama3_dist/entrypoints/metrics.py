"""Prometheus metrics of the serving engine (/metrics), in vLLM's names where they exist."""

from __future__ import annotations

from ..async_engine import AsyncLLMEngine


def render_metrics(engine: AsyncLLMEngine, model_name: str) -> str:
    s = engine.stats()
    label = f'model_name="{model_name}"'
    lines: list[str] = []

    def metric(name, kind, help_text, value, labels=label):
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {value}"])

    p = "llama3_dist_"
    metric(p + "engine_healthy", "gauge", "1 while the engine thread runs, 0 once it has died.", int(engine.is_alive))
    metric(p + "num_requests_running", "gauge", "Sequences in the running batch.", s.num_running)
    metric(p + "num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", s.num_waiting)
    metric(p + "kv_cache_blocks_used", "gauge", "KV cache blocks held by requests.", s.kv_blocks_used)
    metric(p + "kv_cache_blocks_total", "gauge", "KV cache blocks in all.", s.kv_blocks_total)
    metric(
        p + "kv_cache_usage_perc",
        "gauge",
        "Fraction of KV cache blocks in use.",
        s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0,
    )
    metric(p + "num_preemptions_total", "counter", "Preemptions since start.", s.num_preemptions)
    metric(p + "prefix_cache_queries_total", "counter", "Blocks looked up in the prefix cache.", s.prefix_cache_queries)
    metric(p + "prefix_cache_hits_total", "counter", "Blocks found in the prefix cache.", s.prefix_cache_hits)
    metric(p + "generation_tokens_total", "counter", "Tokens generated since start.", s.num_generated_tokens)
    metric(p + "engine_steps_total", "counter", "Engine steps since start.", s.num_steps)
    with engine._lock:
        metric(p + "prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", engine.prompt_tokens_total)
        name = p + "request_success_total"
        lines += [f"# HELP {name} Finished sequences, by finish reason.", f"# TYPE {name} counter"]
        for reason, count in sorted(engine.requests_finished.items()):
            lines.append(f'{name}{{{label},finished_reason="{reason}"}} {count}')
        for hist, name, help_text in [
            (engine.ttft, "time_to_first_token_seconds", "Time from arrival to the first generated token."),
            (engine.tpot, "time_per_output_token_seconds", "Time between generated tokens of a sequence."),
            (engine.e2e, "e2e_request_latency_seconds", "Time from arrival to the last token."),
        ]:
            lines += hist.render(p + name, help_text, label)
    return "\n".join(lines) + "\n"
