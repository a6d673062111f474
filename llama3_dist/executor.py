"""The driver side of execution: where the workers live and how a step reaches them.

LocalExecutor runs one worker in-process (one device, no Ray). RayExecutor (executor_ray.py)
runs one worker actor per device.
"""
from __future__ import annotations

from .config import Llama3Config
from .batch import StepInput
from .worker import StepOutput, Worker


class LocalExecutor:
    def __init__(self, config: Llama3Config, checkpoint_path: str, **worker_kwargs):
        self.worker = Worker(config, checkpoint_path, rank=0, **worker_kwargs)
        self.num_kv_pages = self.worker.num_kv_pages

    def execute(self, step: StepInput) -> StepOutput:
        return self.worker.execute(step)

    def parameter_bytes(self) -> list[dict[str, int]]:
        return [self.worker.parameter_bytes()]

    def close(self) -> None:
        self.worker = None
