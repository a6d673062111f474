"""llama3-dist: a Ray-distributed, tensor-parallel inference engine for Llama 3 family checkpoints."""
import logging as _logging

# Start-up facts (KV cache size, executor choice) reach the user as vLLM's do, unless the
# application configures the "llama3_dist" logger itself.
_logger = _logging.getLogger("llama3_dist")
if not _logger.handlers:
    _handler = _logging.StreamHandler()
    _handler.setFormatter(_logging.Formatter("%(levelname)s llama3_dist: %(message)s"))
    _logger.addHandler(_handler)
    _logger.setLevel(_logging.INFO)
    _logger.propagate = False
from .config import (ConfigError, KVCacheParams, Llama3Config, Llama3RopeScalingParams,
                     LongRoPEScalingParams, ReturnHiddenStates, ReturnLogits)
from .context import TextContext
from .kv_cache import KVCacheExhaustedError
from .engine import LLMEngine
from .llm import LLM
from .outputs import CompletionOutput, Logprob, RequestOutput
from .pipeline import Llama3Inputs, Llama3Model, LogProbabilities, ModelOutputs
from .sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "ConfigError", "KVCacheExhaustedError", "KVCacheParams", "Llama3Config", "Llama3Inputs",
           "Llama3Model", "Llama3RopeScalingParams", "LogProbabilities", "LongRoPEScalingParams",
           "ModelOutputs", "ReturnHiddenStates", "ReturnLogits", "TextContext"]
