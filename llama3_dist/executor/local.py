"""LocalExecutor: one Worker in this process (one device, no Ray)."""

from __future__ import annotations

import torch

from ..config import ConfigError, Llama3Config
from ..core.step_input import StepInput
from . import WorkerError
from .worker import StepOutput, Worker, WorkerStep


class LocalExecutor:
    def __init__(self, config: Llama3Config, checkpoint_path: str, **worker_kwargs):
        device = config.devices[0]
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but this machine has no CUDA device")
        self.worker: Worker | None = Worker(config, checkpoint_path, rank=0, **worker_kwargs)
        self.num_kv_blocks = self.worker.num_kv_blocks

    def _live_worker(self) -> Worker:
        if self.worker is None:
            raise RuntimeError("the executor is closed")
        return self.worker

    runs_ahead = True  # the one worker keeps its sampled tokens for the next step

    def execute(self, step: StepInput) -> StepOutput:
        return self.launch(step).result()

    def launch(self, step: StepInput) -> _RankZeroStep:
        worker = self._live_worker()
        try:
            return _RankZeroStep(worker.launch(step))
        except Exception as e:
            raise _failed(e) from e

    def parameter_bytes(self) -> list[dict[str, int]]:
        return [self._live_worker().parameter_bytes()]

    def check_health(self, timeout_s: float = 10.0) -> None:
        """The worker lives in this process: alive while it is open (a failed step raised already)."""
        self._live_worker()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


class _RankZeroStep:
    """The one worker is rank 0: its launched step always has an output."""

    def __init__(self, step: WorkerStep):
        self._step = step

    def result(self) -> StepOutput:
        try:
            out = self._step.result()
        except Exception as e:
            raise _failed(e) from e
        assert out is not None
        return out


def _failed(e: Exception) -> WorkerError:
    """A worker-side exception in a step: the worker's state (its KV cache, a CUDA context after a
    device fault) can no longer be trusted, so the engine rebuilds it (WorkerError)."""
    return WorkerError(f"rank 0 raised during step: {type(e).__name__}: {e}")
