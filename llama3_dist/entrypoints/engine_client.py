"""EngineClient: what the OpenAI server needs from an engine.

Two implementations: AsyncLLMEngine (one engine on a thread of this process: `llama3-dist serve`)
and ray_serve.ReplicaClient (the Ray Serve ingress's view of the engine replicas behind a
deployment handle). The server's handlers, errors and metrics are the same code for both.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from ..engine import EngineStats
from ..request_metrics import RequestMetrics
from ..sampling_params import PoolingParams, SamplingParams


class EngineClient(Protocol):
    error: str | None  # why the engine is unavailable, once it is
    metrics: RequestMetrics  # latencies and counters of the requests seen here

    @property
    def is_alive(self) -> bool: ...

    @property
    def recovering(self) -> str | None:
        """Why the engine is rebuilding its ranks right now (it serves again after), else None."""
        ...

    @property
    def model_path(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def tokenizer(self) -> Any:
        """A Hugging Face tokenizer, or None when the checkpoint has none."""
        ...

    @property
    def tokenizer_shared(self) -> bool:
        """Whether another thread (the engine's) uses `tokenizer` too: the server then tokenizes
        with a copy of its own (one Rust tokenizer used from two threads can fail with "Already
        borrowed")."""
        ...

    def stats(self) -> EngineStats:
        """The engine's counters (summed over replicas where there are several)."""
        ...

    def replica_stats(self) -> dict[str, EngineStats]:
        """Per replica, by replica id; empty for a single engine."""
        ...

    async def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams | PoolingParams,
        prompt_token_ids: list[int] | None,
        out: asyncio.Queue,
        arrival_time: float | None = None,
        final_only: bool = False,
    ) -> None:
        """Returns once the engine holds the request (ValueError for bad input, EngineDeadError
        when no engine can take it); its cumulative outputs, or an EngineDeadError, go to `out`."""
        ...

    def abort(self, request_id: str) -> None:
        """Drops the request; unknown ids are ignored."""
        ...
