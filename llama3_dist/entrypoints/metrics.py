"""Prometheus metrics of the serving engine (/metrics), in vLLM's names where they exist."""

from __future__ import annotations

from .engine_client import EngineClient

# Per-replica series (Ray Serve): enough to see where requests and prefix-cache hits land.
REPLICA_FIELDS = (  # (metric name, EngineStats field, type, help)
    ("num_requests_running", "num_running", "gauge", "Sequences in the replica's running batch."),
    ("num_requests_waiting", "num_waiting", "gauge", "Sequences waiting in the replica."),
    ("kv_cache_blocks_used", "kv_blocks_used", "gauge", "KV cache blocks held by the replica's requests."),
    ("prefix_cache_queries_total", "prefix_cache_queries", "counter", "Blocks looked up in its prefix cache."),
    ("prefix_cache_hits_total", "prefix_cache_hits", "counter", "Blocks found in the replica's prefix cache."),
    ("generation_tokens_total", "num_generated_tokens", "counter", "Tokens the replica generated."),
    ("engine_restarts_total", "num_restarts", "counter", "Times the replica rebuilt its ranks after a fault."),
)


def render_metrics(engine: EngineClient, model_name: str) -> str:
    """The engine counters are summed over replicas where there are several (Ray Serve), and then
    come again per replica with a `replica` label; the request latencies are those seen here."""
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
    metric(p + "engine_restarts_total", "counter", "Rank groups rebuilt after a rank failed.", s.num_restarts)
    metric(
        p + "requests_retried_total",
        "counter",
        "Unfinished requests recomputed on rebuilt ranks.",
        s.num_requests_retried,
    )
    metric(
        p + "last_recovery_seconds",
        "gauge",
        "Fault to rebuilt ranks, the last time.",
        s.last_recovery_ms / 1000,
    )
    metric(p + "engine_steps_total", "counter", "Engine steps since start.", s.num_steps)
    replicas = engine.replica_stats()
    if replicas:
        metric(p + "num_replicas", "gauge", "Engine replicas that report to this server.", len(replicas))
    for metric_name, field, kind, help_text in REPLICA_FIELDS if replicas else ():
        name = p + "replica_" + metric_name
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for replica_id, rs in sorted(replicas.items()):
            lines.append(f'{name}{{{label},replica="{replica_id}"}} {getattr(rs, field)}')
    m = engine.metrics
    with m.lock:
        metric(p + "prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", m.prompt_tokens_total)
        name = p + "request_success_total"
        lines += [f"# HELP {name} Finished sequences, by finish reason.", f"# TYPE {name} counter"]
        for reason, count in sorted(m.requests_finished.items()):
            lines.append(f'{name}{{{label},finished_reason="{reason}"}} {count}')
        for hist, name, help_text in [
            (m.ttft, "time_to_first_token_seconds", "Time from arrival to the first generated token."),
            (m.tpot, "time_per_output_token_seconds", "Time between generated tokens of a sequence."),
            (m.e2e, "e2e_request_latency_seconds", "Time from arrival to the last token."),
        ]:
            lines += hist.render(p + name, help_text, label)
    return "\n".join(lines) + "\n"
