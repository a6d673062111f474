"""Request-level serving metrics: time to first token, time per output token, end-to-end latency,
prompt tokens and finish reasons, as Prometheus histograms and counters.

One RequestMetrics serves both callers: AsyncLLMEngine observes the outputs of its own engine
(one process), and the Ray Serve ingress observes the outputs streamed back from the engine
replicas, so its latencies include routing and the hop to the replica, as clients see them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .outputs import RequestOutput

# Bucket bounds (seconds) as vLLM's, so dashboards built for it read these too.
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, help_text: str, labels: str = "") -> list[str]:
        """Prometheus text lines; labels like 'model_name="x"' go on every sample."""
        sep = "," if labels else ""
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        total = 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts):
            total += c
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            lines.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
        lines += [f"{name}_sum{{{labels}}} {self.sum!r}", f"{name}_count{{{labels}}} {self.count}"]
        return lines


@dataclass(slots=True)
class RequestTiming:
    """One request's timing state, kept by whoever observes its outputs."""

    arrival: float  # time.monotonic() when the request arrived
    tokens_seen: list[int] = field(default_factory=list)  # per completion index
    last_token_time: list[float] = field(default_factory=list)
    first_token: bool = False


class RequestMetrics:
    """Thread-safe: the engine thread writes, the event loop reads (/metrics) under `lock`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.prompt_tokens_total = 0
        self.requests_finished: dict[str, int] = {}

    def accepted(self, num_prompt_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens_total += num_prompt_tokens

    def observe(self, timing: RequestTiming, out: RequestOutput, now: float) -> None:
        """One cumulative output of a request: new tokens, and its end if it finished."""
        with self.lock:
            if not timing.tokens_seen:
                timing.tokens_seen = [0] * len(out.outputs)
                timing.last_token_time = [now] * len(out.outputs)
            for i, c in enumerate(out.outputs):
                new = len(c.token_ids) - timing.tokens_seen[i]
                if new <= 0:
                    continue
                if timing.tokens_seen[i] == 0:
                    if not timing.first_token:
                        timing.first_token = True
                        self.ttft.observe(now - timing.arrival)
                else:
                    per_token = (now - timing.last_token_time[i]) / new
                    for _ in range(new):
                        self.tpot.observe(per_token)
                timing.tokens_seen[i] += new
                timing.last_token_time[i] = now
            if out.finished:
                self.e2e.observe(now - timing.arrival)
                for c in out.outputs:
                    reason = c.finish_reason or "abort"
                    self.requests_finished[reason] = self.requests_finished.get(reason, 0) + 1
