"""llama3-dist: a Ray-distributed, tensor-parallel inference engine for Llama 3 family checkpoints."""
from .config import (ConfigError, KVCacheParams, Llama3Config, Llama3RopeScalingParams,
                     LongRoPEScalingParams, ReturnHiddenStates, ReturnLogits)
from .context import TextContext
from .kv_cache import KVCacheExhaustedError
from .pipeline import Llama3Inputs, Llama3Model, LogProbabilities, ModelOutputs

__all__ = ["ConfigError", "KVCacheExhaustedError", "KVCacheParams", "Llama3Config", "Llama3Inputs",
           "Llama3Model", "Llama3RopeScalingParams", "LogProbabilities", "LongRoPEScalingParams",
           "ModelOutputs", "ReturnHiddenStates", "ReturnLogits", "TextContext"]
