"""Where the workers live and how a step reaches them (the driver side of execution).

Two executors implement one protocol: LocalExecutor runs one Worker in-process (one device, no
Ray); RayExecutor runs one Worker actor per device (ray_executor.py on the driver, ray_worker.py
in each actor). The engine and the MAX-style model API only see `Executor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..config import ConfigError, Llama3Config

if TYPE_CHECKING:
    from ..core.step_input import StepInput
    from .worker import StepOutput


class WorkerError(RuntimeError):
    """A rank failed (died, raised in a step, missed a health check or a collective's timeout):
    the executor is out of step for good. The engine closes it and builds a new one."""


class PendingStep(Protocol):
    """A step under way on the ranks; result() waits for rank 0's output."""

    def result(self) -> StepOutput: ...


@dataclass(slots=True)
class FinishedStep:
    """A PendingStep whose output is already here."""

    output: StepOutput

    def result(self) -> StepOutput:
        return self.output


class Executor(Protocol):
    """Runs steps on every tensor-parallel rank; only rank 0's output comes back."""

    num_kv_blocks: int  # KV cache blocks per rank (every rank holds the same number)
    # Whether a step may take its input tokens from the previous step's sampled tokens on the
    # device (StepInput.previous_rows), so that the engine can schedule it before those are back.
    runs_ahead: bool

    def execute(self, step: StepInput) -> StepOutput: ...

    def launch(self, step: StepInput) -> PendingStep:
        """Starts the step; returns before it has finished where the ranks can (a GPU)."""
        ...

    def parameter_bytes(self) -> list[dict[str, int]]:
        """Per rank: bytes of its sharded and of its replicated parameters."""
        ...

    def check_health(self, timeout_s: float = 10.0) -> None:
        """Raises (WorkerError for Ray ranks) if a rank is dead, failed earlier or does not answer
        within timeout_s; callable from any thread while steps run (a serving replica's probe)."""
        ...

    def close(self) -> None: ...


def make_executor(config: Llama3Config, path: str, kind: str, worker_kwargs: dict, **executor_kwargs) -> Executor:
    """executor_kwargs are the Ray executor's options (address, placement_strategy, ...): giving
    any of them asks for Ray, even at one device."""
    if kind not in ("auto", "local", "ray"):
        raise ConfigError(f"unknown executor {kind!r}; use 'auto', 'local' or 'ray'")
    if kind == "auto":
        kind = "local" if config.tp_degree == 1 and not executor_kwargs else "ray"
    if kind == "local":
        if config.tp_degree != 1:
            raise ConfigError(f"the local executor runs one device, got {config.devices}; use executor='ray'")
        if executor_kwargs:
            raise ConfigError(
                f"{sorted(executor_kwargs)} are options of the Ray executor; drop them or use executor='ray'"
            )
        from .local import LocalExecutor

        return LocalExecutor(config, path, **worker_kwargs)
    from ..model.gguf import release_readers
    from .ray_executor import RayExecutor

    executor = RayExecutor(config, path, worker_kwargs, **executor_kwargs)
    # The ranks read the checkpoint in their own processes (the local executor's worker releases
    # it after loading): this process's parse of a GGUF file, for the config and tokenizer, can go.
    release_readers()
    return executor
