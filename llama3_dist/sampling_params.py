"""SamplingParams: how to sample one request (vLLM's names, defaults and meanings), validated
where it is made so that a bad value is refused before the engine holds anything."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Below this a temperature means greedy, as in vLLM.
SAMPLING_EPS = 1e-5


class SamplingParams(BaseModel):
    """How to sample one request. Names, defaults and meanings are vLLM's.

    For n > 1 with a seed, give child i the seed `seed + i` (as vLLM does), or all n children
    draw the same tokens.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = Field(default_factory=list)
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # how many top log-probabilities per generated token
    prompt_logprobs: int | None = None  # the same, per prompt token
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if any(isinstance(s, str) and s == "" for s in v):
            raise ValueError("stop strings must not be empty, got ''")
        return v

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids_list(cls, v):
        return [] if v is None else v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v < 1:
            raise ValueError(f"n must be at least 1, got {v}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if not v >= 0.0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v):
        if v < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive count, got {v}")
        return v

    @field_validator("min_p")
    @classmethod
    def _min_p(cls, v):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {v}")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        if v < 1:
            raise ValueError(f"max_tokens must be at least 1, got {v}")
        return v

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens(cls, v):
        if v < 0:
            raise ValueError(f"min_tokens must be >= 0, got {v}")
        return v

    @field_validator("logprobs", "prompt_logprobs")
    @classmethod
    def _logprobs(cls, v, info):
        if v is not None and v < 0:
            raise ValueError(f"{info.field_name} must be >= 0 (or None for none), got {v}")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, v, info):
        if not -2.0 <= v <= 2.0:
            raise ValueError(f"{info.field_name} must be in [-2, 2], got {v}")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty(cls, v):
        if not (v > 0.0 and np.isfinite(v)):
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {v}")
        return v

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
