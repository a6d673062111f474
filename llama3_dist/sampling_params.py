"""SamplingParams: how to sample one request (vLLM's names, defaults and meanings), validated
where it is made so that a bad value is refused before the engine holds anything."""

from __future__ import annotations

import json as _json
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Below this a temperature means greedy, as in vLLM.
SAMPLING_EPS = 1e-5
# The largest schema, regex, choice list or grammar accepted (its text, in bytes): compiling and
# matching cost grows with it, and one request must not stall the grammar threads for everyone.
MAX_GRAMMAR_BYTES = 64 * 1024
# OpenAI's range for logit_bias values.
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's names): exactly one of a JSON schema (a dict or
    its JSON text), any JSON object, a regex, a choice among strings, or a grammar (GBNF/EBNF as
    llama.cpp writes it, or llguidance's Lark syntax). Checked for shape and size here; the
    grammar itself is checked when it is compiled (LLMEngine.add_request)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self):
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError(
                "structured outputs need exactly one of json, regex, choice, grammar or json_object; "
                f"got {', '.join(given) or 'none'}"
            )
        if isinstance(self.json, str):
            try:
                schema = _json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        elif self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"a JSON schema must be an object or its JSON text, got {type(self.json).__name__}")
        choice_ok = isinstance(self.choice, list) and self.choice and all(isinstance(c, str) and c for c in self.choice)
        if self.choice is not None and not choice_ok:
            raise ValueError(f"choice must be a non-empty list of non-empty strings, got {self.choice!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        size = len(self.text.encode())
        if size > MAX_GRAMMAR_BYTES:
            raise ValueError(f"the {given[0]} constraint has {size} bytes; at most {MAX_GRAMMAR_BYTES} are accepted")

    @property
    def kind(self) -> str:
        """json, json_object, regex, choice or grammar."""
        if self.json is not None:
            return "json"
        if self.json_object:
            return "json_object"
        return next(k for k in ("regex", "choice", "grammar") if getattr(self, k) is not None)

    @property
    def text(self) -> str:
        """The constraint as text, canonical for JSON (sorted keys, no spaces): with kind, the
        key its compiled grammar is cached by."""
        if self.json is not None:
            schema = _json.loads(self.json) if isinstance(self.json, str) else self.json
            return _json.dumps(schema, sort_keys=True, separators=(",", ":"))
        if self.json_object:
            return ""
        if self.choice is not None:
            return _json.dumps(self.choice)
        return str(self.regex if self.regex is not None else self.grammar)


class PoolingParams(BaseModel):
    """An embedding request instead of a generation: the final hidden states (after the final
    norm) of the prompt's tokens, pooled ("mean" over the tokens, or the "last" token's) and
    L2-normalised. A causal LM's states, not a trained embedding model's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pooling: str = "mean"

    @field_validator("pooling")
    @classmethod
    def _pooling(cls, v):
        if v not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {v!r}")
        return v


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
    # token id -> added to its logit, in [-100, 100] (OpenAI's logit_bias); ids are checked
    # against the vocabulary by the engine
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None

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

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for token, bias in (v or {}).items():
            if token < 0:
                raise ValueError(f"logit_bias: token id {token} is negative")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:  # also refuses NaN
                raise ValueError(
                    f"logit_bias: the bias of token {token} is {bias}; it must be in [-{MAX_LOGIT_BIAS:g}, "
                    f"{MAX_LOGIT_BIAS:g}]"
                )
        return v or None

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
