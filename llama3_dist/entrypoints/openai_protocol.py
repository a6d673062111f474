"""The OpenAI API's request bodies (with vLLM's extensions) and its error shape.

Requests are lenient where OpenAI's are (unknown fields are ignored) and strict about values:
a bad one becomes an APIError, answered as {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..sampling_params import StructuredOutputsParams

MAX_LOGPROBS = 20


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = code if code is not None else status
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code or 400)


def from_validation_error(e: ValidationError, prefix: str = "") -> APIError:
    """The first pydantic error as an OpenAI 400: its field as param, its message as message."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    msg = err.get("msg", str(e)).removeprefix("Value error, ")
    if loc and not msg.startswith(loc):
        msg = f"{loc}: {msg}"
    return bad_request(prefix + msg, param=loc or None)


class _Lenient(BaseModel):
    # Unknown fields are ignored, as by OpenAI and vLLM (clients send fields of newer API versions).
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class SamplingFields(_Lenient):
    """The parameters both endpoints share: OpenAI's, then vLLM's extensions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored
    metadata: dict[str, Any] | None = None  # accepted and ignored
    response_format: dict[str, Any] | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The one constraint this request sets, from OpenAI's response_format, vLLM's guided_*
        fields or vLLM's structured_outputs object; an APIError naming the field when it is
        malformed or when more than one is given."""
        found: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type", "text") if isinstance(rf, dict) else None
            if kind == "json_object":
                found.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise bad_request(
                        "response_format.json_schema must be an object with a 'schema' (a JSON schema object), "
                        "e.g. {'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': {...}}}",
                        param="response_format",
                    )
                found.append(("response_format", {"json": spec["schema"]}))
            elif kind != "text":
                raise bad_request(
                    f"response_format.type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'",
                    param="response_format",
                )
        for name, key in (
            ("guided_json", "json"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ):
            value = getattr(self, name)
            if value is not None:
                found.append((name, {key: value}))
        if self.structured_outputs is not None:
            allowed = {"json", "regex", "choice", "grammar", "json_object"}
            unknown = sorted(set(self.structured_outputs) - allowed)
            if unknown:
                raise bad_request(
                    f"structured_outputs: unknown field(s) {', '.join(unknown)}; "
                    f"use one of {', '.join(sorted(allowed))}",
                    param="structured_outputs",
                )
            found.append(("structured_outputs", dict(self.structured_outputs)))
        if not found:
            return None
        if len(found) > 1:
            raise bad_request(
                f"give one constraint, not several: {', '.join(name for name, _ in found)}", param=found[1][0]
            )
        name, fields = found[0]
        try:
            return StructuredOutputsParams(**fields)
        except (TypeError, ValueError) as e:
            raise bad_request(f"{name}: {e}", param=name) from None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result answers this call


class TokenizeRequest(_Lenient):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class EmbeddingRequest(_Lenient):
    model: str | None = None
    input: str | list[int] | list[str] | list[list[int]]
    encoding_format: str = "float"  # or "base64": little-endian float32
    dimensions: int | None = None  # refused: the size is the model's hidden size
    user: str | None = None  # accepted and ignored
    pooling: str = "mean"  # vLLM-style extension: "mean" or "last" (token)


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    # vLLM's extensions
    add_generation_prompt: bool = True
