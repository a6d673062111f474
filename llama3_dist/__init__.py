"""llama3-dist: a Ray-distributed, tensor-parallel inference engine for Llama 3 family checkpoints.

The public API is imported lazily (PEP 562): `from llama3_dist import LLM` loads the engine and
torch, while the driver-side core (`llama3_dist.core`) and the config load neither. The code map
is docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import importlib
import logging as _logging
from typing import TYPE_CHECKING, Any

# Start-up facts (KV cache size, executor choice) reach the user as vLLM's do, unless the
# application configures the "llama3_dist" logger itself.
_logger = _logging.getLogger("llama3_dist")
if not _logger.handlers:
    _handler = _logging.StreamHandler()
    _handler.setFormatter(_logging.Formatter("%(levelname)s llama3_dist: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(_logging.INFO)
    _logger.propagate = False

# name -> the module that defines it
_EXPORTS = {
    "LLM": ".llm",
    "LLMEngine": ".engine",
    "SamplingParams": ".sampling_params",
    "RequestOutput": ".outputs",
    "CompletionOutput": ".outputs",
    "Logprob": ".outputs",
    "ConfigError": ".config",
    "KVCacheParams": ".config",
    "Llama3Config": ".config",
    "Llama3RopeScalingParams": ".config",
    "LongRoPEScalingParams": ".config",
    "ReturnHiddenStates": ".config",
    "ReturnLogits": ".config",
    "TextContext": ".core.text_context",
    "KVCacheExhaustedError": ".core.block_manager",
    "Llama3Inputs": ".max_model",
    "Llama3Model": ".max_model",
    "LogProbabilities": ".max_model",
    "ModelOutputs": ".max_model",
}
__all__ = [  # the names of _EXPORTS, spelled out for tools that read __all__ statically
    "LLM",
    "CompletionOutput",
    "ConfigError",
    "KVCacheExhaustedError",
    "KVCacheParams",
    "LLMEngine",
    "Llama3Config",
    "Llama3Inputs",
    "Llama3Model",
    "Llama3RopeScalingParams",
    "LogProbabilities",
    "Logprob",
    "LongRoPEScalingParams",
    "ModelOutputs",
    "RequestOutput",
    "ReturnHiddenStates",
    "ReturnLogits",
    "SamplingParams",
    "TextContext",
]
assert set(__all__) == set(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llama3_dist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from .config import (
        ConfigError,
        KVCacheParams,
        Llama3Config,
        Llama3RopeScalingParams,
        LongRoPEScalingParams,
        ReturnHiddenStates,
        ReturnLogits,
    )
    from .core.block_manager import KVCacheExhaustedError
    from .core.text_context import TextContext
    from .engine import LLMEngine
    from .llm import LLM
    from .max_model import Llama3Inputs, Llama3Model, LogProbabilities, ModelOutputs
    from .outputs import CompletionOutput, Logprob, RequestOutput
    from .sampling_params import SamplingParams
