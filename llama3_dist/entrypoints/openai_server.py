"""An OpenAI-compatible HTTP server on the engine's step API (FastAPI + uvicorn).

    POST /v1/completions, POST /v1/chat/completions   ("stream": true: server-sent events, then [DONE])
    POST /tokenize, POST /detokenize                   (vLLM's shapes)
    GET  /v1/models, GET /health, GET /metrics         (Prometheus text format)

Structured outputs (response_format, guided_*, structured_outputs) compile on the grammar
compiler's threads before the engine sees the request (core/grammar.py); tools, tool_choice and
the tool-call parsers are in tool_calls.py.

One thread owns the engine (AsyncLLMEngine); handlers on the event loop tokenize, validate, queue
requests and read their outputs from per-request asyncio queues. Parameters follow the OpenAI
API plus vLLM's extensions (top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids, ...); errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}.
A client that disconnects has its requests aborted, which frees their KV blocks.

`llama3-dist serve` runs `serve()`. The request bodies are in openai_protocol.py, /metrics in
metrics.py, the load test in bench.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hmac
import json
import logging
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..async_engine import AsyncLLMEngine, EngineDeadError
from ..core.grammar import GrammarCompiler, GrammarError, grammar_key, shared_compiler
from ..outputs import LogprobsDict, RequestOutput
from ..sampling_params import PoolingParams, SamplingParams, StructuredOutputsParams
from .engine_client import EngineClient
from .metrics import render_metrics
from .openai_protocol import (
    MAX_LOGPROBS,
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    SamplingFields,
    TokenizeRequest,
    bad_request,
    from_validation_error,
)
from .tool_calls import (
    forced_call_grammar,
    may_start_call,
    new_call_id,
    parse_tool_calls,
    render_message_tool_calls,
    resolve_parser,
    streamed_calls,
    validate_tools,
)

logger = logging.getLogger("llama3_dist")

DEFAULT_MODEL_NAME = "llama3-dist-default"
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one request may ask of the server; each breach is an OpenAI-format error naming the
    limit and its flag, and the server keeps serving everyone else."""

    max_prompt_tokens: int | None = None  # None: the model's context (400 beyond)
    max_tokens: int | None = None  # completion tokens one choice may ask for; None: the context
    max_n: int = 16  # choices per request (400 beyond)
    max_logprobs: int = MAX_LOGPROBS
    max_body_bytes: int = 4 << 20  # 413 beyond
    max_active_requests: int = 1024  # engine requests running or queued through this server (429 beyond)
    request_timeout_s: float | None = 600.0  # then the request is aborted, its blocks freed (408)

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the model's context), got {value}")
        for name in ("max_n", "max_body_bytes", "max_active_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"max_logprobs must be in [0, {MAX_LOGPROBS}], got {self.max_logprobs}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0 (or None: no timeout), got {self.request_timeout_s}")


@dataclass(frozen=True, slots=True)
class _ToolSetup:
    """A chat request's tools: what the template renders, how the output is parsed (None: not
    parsed), and the grammar that forces a call (tool_choice "required" or a named function)."""

    tools: list[dict]
    parser: str | None
    forced: StructuredOutputsParams | None


# ============================================================================ the server
class OpenAIServer:
    """The handlers; `engine` is an AsyncLLMEngine here, or the Ray Serve ingress's client of the
    engine replicas (ray_serve.py)."""

    def __init__(
        self,
        engine: EngineClient,
        served_model_name: str | None = None,
        api_key: str | None = None,
        limits: ServerLimits | None = None,
        tool_call_parser: str = "auto",
    ):
        self.engine = engine
        self.limits = limits or ServerLimits()
        self.active_requests = 0  # engine requests submitted here and not yet finished or aborted
        self.model_path = engine.model_path
        self.model_name = served_model_name or DEFAULT_MODEL_NAME
        self.api_key = api_key
        self.max_model_len = engine.max_model_len
        # A tokenizer of our own where the engine's thread uses the engine's (a Rust tokenizer
        # shared between threads can fail with "Already borrowed"); copying a 128k vocabulary
        # takes ~1 s, so a client's own tokenizer is used as it is.
        tokenizer = engine.tokenizer
        self.tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None and engine.tokenizer_shared else tokenizer
        self.created = int(time.time())
        template = getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None
        self.tool_parser = resolve_parser(tool_call_parser, template if isinstance(template, str) else None)

    # --- shared steps -----------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model_name}` (GET /v1/models).",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise bad_request(
                f"the checkpoint {self.model_path!r} has no tokenizer; send the prompt as a list of token ids",
                param="prompt",
            )
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _max_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        """OpenAI's context check: prompt plus completion must fit the context."""
        cap = self.limits.max_prompt_tokens
        if cap is not None and prompt_len > cap:
            raise bad_request(
                f"the prompt has {prompt_len} tokens; this server accepts at most {cap} (--max-prompt-tokens)",
                param=param,
                code="prompt_too_long",
            )
        if requested is not None and self.limits.max_tokens is not None and requested > self.limits.max_tokens:
            raise bad_request(
                f"max_tokens is {requested}; this server allows at most {self.limits.max_tokens} (--max-tokens-cap)",
                param="max_tokens",
            )
        limit = self.max_model_len
        if prompt_len >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{prompt_len} tokens. Please reduce the length of the prompt.",
                param=param,
                code="context_length_exceeded",
            )
        if requested is None:
            return min(limit - prompt_len, self.limits.max_tokens or limit)
        if requested + prompt_len > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{requested + prompt_len} tokens ({prompt_len} in the prompt, {requested} in the "
                f"completion). Please reduce the length of the prompt or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def _params(
        self,
        req: SamplingFields,
        max_tokens: int,
        logprobs: int | None,
        structured: StructuredOutputsParams | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """The request's SamplingParams; `structured` (a tool_choice's grammar) stands in for the
        request's own constraint fields."""
        top = self.limits.max_logprobs
        if logprobs is not None and not 0 <= logprobs <= top:
            raise bad_request(f"logprobs must be in [0, {top}], got {logprobs}", param="logprobs")
        if req.n > self.limits.max_n:
            raise bad_request(f"n is {req.n}; this server allows at most {self.limits.max_n} (--max-n)", param="n")
        fields = dict(
            n=req.n,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens,
            seed=req.seed,
            stop=req.stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            logit_bias=self._logit_bias(req.logit_bias),
            structured_outputs=structured if structured is not None else req.structured_outputs_params(),
            prompt_logprobs=prompt_logprobs,
        )
        optional = dict(
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
        )
        fields.update({k: v for k, v in optional.items() if v is not None})
        try:
            return SamplingParams.model_validate(fields)
        except ValidationError as e:
            raise from_validation_error(e) from None

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        """OpenAI's logit_bias (token ids as JSON keys) as ints, each a token of the vocabulary."""
        if not bias:
            return None
        vocab = len(self.tokenizer) if self.tokenizer is not None else None
        out: dict[int, float] = {}
        for key, value in bias.items():
            try:
                token = int(key)
            except ValueError:
                raise bad_request(f"logit_bias: {key!r} is not a token id (an integer)", param="logit_bias") from None
            if token < 0 or (vocab is not None and token >= vocab):
                raise bad_request(
                    f"logit_bias: token id {token} is not in the vocabulary (ids 0 to "
                    f"{'' if vocab is None else vocab - 1})",
                    param="logit_bias",
                )
            out[token] = value
        return out

    def grammar_compiler(self) -> GrammarCompiler:
        if self.tokenizer is None:
            raise bad_request(f"structured outputs need a tokenizer; {self.model_path!r} has none")
        return shared_compiler(self.tokenizer, self.tokenizer.eos_token_id)

    async def _compile_grammar(self, params: SamplingParams, param: str) -> None:
        """Compiles the request's grammar on the compiler's threads (never on the event loop or
        the engine's thread), so that a bad schema is a 400 here and the engine finds it cached."""
        if params.structured_outputs is None:
            return
        try:
            await asyncio.wrap_future(self.grammar_compiler().compile_async(grammar_key(params.structured_outputs)))
        except GrammarError as e:
            raise bad_request(str(e), param=param, code="invalid_grammar") from None
        except ImportError as e:
            raise bad_request(str(e), param=param) from None

    async def _submit(
        self,
        prompts: list[tuple[str | None, list[int]]],
        params: SamplingParams | PoolingParams,
        base_id: str,
        arrival: float,
        stream: bool,
    ) -> tuple[asyncio.Queue, list[str]]:
        """Adds one engine request per prompt, all delivering to one queue; all or none. Past
        max_active_requests the request is refused (429 with Retry-After), not queued without end."""
        limit = self.limits.max_active_requests
        if self.active_requests + len(prompts) > limit:
            raise APIError(
                429,
                f"the server has {self.active_requests} requests running or queued, its limit is {limit} "
                f"(--max-active-requests); retry shortly",
                "rate_limit_error",
                None,
                "too_many_requests",
                headers={"Retry-After": "1"},
            )
        out: asyncio.Queue = asyncio.Queue()
        rids: list[str] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                rid = f"{base_id}-{i}"
                rids.append(rid)
                await self.engine.add_request(rid, text, params, ids, out, arrival_time=arrival, final_only=not stream)
                self.active_requests += 1
        except BaseException as e:
            self.active_requests -= len(rids) - 1  # the one that failed was never counted
            for rid in rids:
                self.engine.abort(rid)
            if isinstance(e, EngineDeadError):
                raise APIError(503, str(e), "server_error", None, "engine_dead") from None
            if isinstance(e, ValueError):
                raise bad_request(str(e), param="prompt") from None
            raise
        return out, rids

    async def _collect(self, out: asyncio.Queue, rids: list[str], request: Request) -> dict[str, RequestOutput]:
        """Waits for every request to finish; aborts them all if the client goes away."""
        final: dict[str, RequestOutput] = {}
        gone = asyncio.ensure_future(_wait_disconnect(request))
        deadline = self._deadline()
        try:
            while len(final) < len(rids):
                get = asyncio.ensure_future(out.get())
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, _ = await asyncio.wait({get, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if gone in done:
                        raise asyncio.CancelledError("client disconnected")
                    raise self._timed_out()
                item = get.result()
                if isinstance(item, BaseException):
                    raise APIError(503, str(item), "server_error", None, "engine_dead")
                if item.finished:
                    final[item.request_id] = item
        finally:
            gone.cancel()
            for rid in rids:
                if rid not in final:
                    self.engine.abort(rid)
            self.active_requests -= len(rids)
        return final

    def _deadline(self) -> float | None:
        timeout = self.limits.request_timeout_s
        return None if timeout is None else time.monotonic() + timeout

    def _timed_out(self) -> APIError:
        return APIError(
            408,
            f"the request took longer than {self.limits.request_timeout_s:g} s (--request-timeout) and was aborted",
            "timeout_error",
            None,
            "request_timeout",
        )

    async def _stream_events(self, out: asyncio.Queue, rids: list[str], on_output, usage_chunk, include_usage: bool):
        """SSE frames: on_output(item) -> chunks for each engine output, then [DONE]. The usage
        comes in a last chunk of its own if the client asked for it (stream_options), else on the
        last content chunk. Leaving early (the client disconnected) aborts the unfinished requests."""
        pending = set(rids)
        deadline = self._deadline()
        try:
            failed: BaseException | APIError | None = None
            while pending and failed is None:
                # Outputs are cumulative: after a wait, only each request's newest one matters (a
                # client that reads slowly gets fewer, larger chunks instead of a growing backlog).
                try:
                    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                    items = [await asyncio.wait_for(out.get(), timeout)]
                except asyncio.TimeoutError:
                    failed = self._timed_out()
                    break
                while not out.empty():
                    items.append(out.get_nowait())
                failed = next((i for i in items if isinstance(i, BaseException)), None)
                newest = {i.request_id: i for i in items if not isinstance(i, BaseException)}
                frames: list[str] = []
                for item in newest.values():
                    chunks = on_output(item)
                    if item.finished:
                        pending.discard(item.request_id)
                    if not pending and chunks and not include_usage:
                        chunks[-1]["usage"] = usage_chunk()["usage"]
                    frames += map(_sse, chunks)
                if frames:
                    yield "".join(frames)
            if isinstance(failed, APIError):
                yield _sse(failed.body())
            elif failed is not None:
                yield _sse(APIError(503, str(failed), "server_error", None, "engine_dead").body())
            elif include_usage:
                yield _sse(usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            for rid in pending:
                self.engine.abort(rid)
            self.active_requests -= len(rids)

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def _token_str(self, lp: LogprobsDict | None, tid: int) -> str:
        if lp is None:  # the first prompt token, which nothing scores
            return self._decode([tid]) if self.tokenizer is not None else f"token_id:{tid}"
        entry = lp.get(tid)
        if entry is not None and entry.decoded_token is not None:
            return entry.decoded_token
        return f"token_id:{tid}"

    # --- /v1/completions --------------------------------------------------------------------
    async def completions(self, request: Request):
        arrival = time.monotonic()
        req = await _parse(request, CompletionRequest, self.limits.max_body_bytes)
        self._check_model(req.model)
        if req.suffix:
            raise bad_request(
                "suffix (fill-in-the-middle) is not supported: Llama 3 models have no fill-in-the-middle tokens; "
                "put all the text before the gap in the prompt",
                param="suffix",
            )
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request(f"best_of ({req.best_of}) other than n ({req.n}) is not supported", param="best_of")
        prompts = self._completion_prompts(req.prompt)
        longest = max(len(ids) for _, ids in prompts)
        max_tokens = self._max_tokens(req.max_tokens, longest, "prompt")
        # echo with logprobs: the prompt's tokens are scored too, and lead the logprobs (OpenAI's shape)
        echo_logprobs = req.echo and req.logprobs is not None
        params = self._params(req, max_tokens, req.logprobs, prompt_logprobs=req.logprobs if echo_logprobs else None)
        await self._compile_grammar(params, "response_format")
        base_id = f"cmpl-{uuid.uuid4().hex}"
        out, rids = await self._submit(prompts, params, base_id, arrival, req.stream)
        created = int(time.time())
        n = req.n
        index_of = {rid: i for i, rid in enumerate(rids)}
        echo = {
            rid: (text if text is not None else self._decode(ids)) if req.echo else ""
            for rid, (text, ids) in zip(rids, prompts)
        }
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        prompt_ids = {rid: ids for rid, (_, ids) in zip(rids, prompts)}

        def lead(item: RequestOutput) -> tuple[list[int], list[LogprobsDict | None]]:
            """echo with logprobs: the prompt's tokens and log-probabilities (the first has none)."""
            if not echo_logprobs:
                return [], []
            return prompt_ids[item.request_id], list(item.prompt_logprobs or [])

        def choice(rid, c, text, token_ids, lps, start_offset, finish):
            logprobs = None
            if req.logprobs is not None:
                logprobs = self._completion_logprobs(token_ids, lps, start_offset)
            return {
                "index": index_of[rid] * n + c.index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
                "stop_reason": c.stop_reason if finish else None,
            }

        if not req.stream:
            final = await self._collect(out, rids, request)
            choices = [
                choice(
                    rid,
                    c,
                    echo[rid] + c.text,
                    lead(final[rid])[0] + c.token_ids,
                    lead(final[rid])[1] + (c.logprobs or []),
                    0,
                    c.finish_reason,
                )
                for rid in rids
                for c in final[rid].outputs
            ]
            completion_tokens = sum(len(c.token_ids) for r in final.values() for c in r.outputs)
            return JSONResponse(
                {
                    "id": base_id,
                    "object": "text_completion",
                    "created": created,
                    "model": self.model_name,
                    "choices": choices,
                    "usage": self._usage(prompt_tokens, completion_tokens),
                }
            )

        sent: dict[tuple[str, int], list[int]] = {}  # (rid, index) -> [chars, tokens, text offset]
        done: set[tuple[str, int]] = set()  # choices whose finish_reason has gone out
        totals = {"completion": 0}

        def on_output(item: RequestOutput):
            chunks = []
            for c in item.outputs:
                key = (item.request_id, c.index)
                first = key not in sent
                chars, toks, offset = sent.setdefault(key, [0, 0, 0 if echo_logprobs else len(echo[item.request_id])])
                text, new_ids = c.text[chars:], c.token_ids[toks:]
                newly_done = c.finish_reason is not None and key not in done
                if not text and not new_ids and not newly_done and not first:
                    continue
                if newly_done:
                    done.add(key)
                lps: list[LogprobsDict | None] = list((c.logprobs or [])[toks : toks + len(new_ids)])
                prefix = echo[item.request_id] if first else ""
                if first:
                    lead_ids, lead_lps = lead(item)
                    new_ids, lps = lead_ids + new_ids, lead_lps + lps
                chunks.append(
                    {
                        "id": base_id,
                        "object": "text_completion",
                        "created": created,
                        "model": self.model_name,
                        "choices": [
                            choice(
                                item.request_id,
                                c,
                                prefix + text,
                                new_ids,
                                lps,
                                offset,
                                c.finish_reason if newly_done else None,
                            )
                        ],
                    }
                )
                totals["completion"] += len(c.token_ids) - toks
                sent[key] = [
                    len(c.text),
                    len(c.token_ids),
                    offset + sum(len(self._token_str(lp, t)) for lp, t in zip(lps, new_ids)),
                ]
            return chunks

        def usage_chunk():
            return {
                "id": base_id,
                "object": "text_completion",
                "created": created,
                "model": self.model_name,
                "choices": [],
                "usage": self._usage(prompt_tokens, totals["completion"]),
            }

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _SSEResponse(self._stream_events(out, rids, on_output, usage_chunk, include_usage))

    def _completion_prompts(self, prompt, param: str = "prompt") -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str):
            return [(prompt, self._encode(prompt))]
        if not prompt:
            raise bad_request(f"{param} must not be empty", param=param)
        if all(isinstance(p, int) for p in prompt):
            return [(None, list(prompt))]
        if all(isinstance(p, str) for p in prompt):
            return [(p, self._encode(p)) for p in prompt]
        if all(isinstance(p, list) for p in prompt):
            if any(not p for p in prompt):
                raise bad_request(f"{param} token lists must not be empty", param=param)
            return [(None, list(p)) for p in prompt]
        raise bad_request(
            f"{param} must be a string, a list of strings, a list of token ids or a list of lists of token ids",
            param=param,
        )

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _completion_logprobs(self, token_ids, lps: list[LogprobsDict | None], start_offset: int) -> dict:
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = start_offset
        for tid, lp in zip(token_ids, lps):
            s = self._token_str(lp, tid)
            tokens.append(s)
            token_logprobs.append(lp[tid].logprob if lp is not None and tid in lp else None)
            top.append(None if lp is None else {self._token_str(lp, t): v.logprob for t, v in lp.items()})
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    # --- /v1/chat/completions ---------------------------------------------------------------
    async def chat_completions(self, request: Request):
        arrival = time.monotonic()
        req = await _parse(request, ChatCompletionRequest, self.limits.max_body_bytes)
        self._check_model(req.model)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
        tools = self._tool_setup(req)
        ids = self._chat_prompt(req, tools)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._max_tokens(requested, len(ids), "messages")
        k = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, max_tokens, k, structured=tools.forced if tools else None)
        await self._compile_grammar(params, "tool_choice" if tools and tools.forced else "response_format")
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        out, rids = await self._submit([(None, ids)], params, base_id, arrival, req.stream)
        created = int(time.time())
        prompt_tokens = len(ids)
        parser = tools.parser if tools else None  # None: the text is all content

        if not req.stream:
            final = (await self._collect(out, rids, request))[rids[0]]
            choices = []
            for c in final.outputs:
                content, calls = parse_tool_calls(parser, c.text) if parser else (c.text, [])
                message: dict = {"role": "assistant", "content": content}
                finish = c.finish_reason
                if calls:
                    message["tool_calls"] = [call.to_openai(new_call_id()) for call in calls]
                    finish = "tool_calls"
                choices.append(
                    {
                        "index": c.index,
                        "message": message,
                        "logprobs": self._chat_logprobs(c.token_ids, c.logprobs, k) if k is not None else None,
                        "finish_reason": finish,
                        "stop_reason": c.stop_reason,
                    }
                )
            completion_tokens = sum(len(c.token_ids) for c in final.outputs)
            return JSONResponse(
                {
                    "id": base_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": self.model_name,
                    "choices": choices,
                    "usage": self._usage(prompt_tokens, completion_tokens),
                }
            )

        sent: dict[int, list[int]] = {}  # index -> [chars of content sent, tokens]
        done: set[int] = set()  # choices whose finish_reason has gone out
        calls_sent: dict[int, list[tuple[str, str]]] = {}  # index -> (call id, arguments sent) per call
        totals = {"completion": 0}

        def chunk(choices):
            return {
                "id": base_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.model_name,
                "choices": choices,
            }

        def delta(index: int, body: dict, logprobs=None, finish=None, stop_reason=None) -> dict:
            entry = {"index": index, "delta": body, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                entry["stop_reason"] = stop_reason
            return chunk([entry])

        def on_output(item: RequestOutput):
            chunks = []
            for c in item.outputs:
                if c.index not in sent:
                    sent[c.index] = [0, 0]
                    chunks.append(delta(c.index, {"role": "assistant", "content": ""}))
                chars, toks = sent[c.index]
                newly_done = c.finish_reason is not None and c.index not in done
                # With tools, text from where a call may begin is held back from the content; a
                # call goes out as tool_calls deltas once its name and the start of its arguments
                # are written, its arguments as they grow; at the end the whole text is parsed: a
                # call is never sent as content, nor content lost.
                limit = len(c.text)
                hold = None
                if parser and not newly_done:
                    hold = may_start_call(parser, c.text)
                    limit = limit if hold is None else max(chars, hold)
                text, new_ids = c.text[chars:limit], c.token_ids[toks:]
                if not text and not new_ids and not newly_done:
                    continue
                logprobs = None
                if k is not None:
                    logprobs = self._chat_logprobs(new_ids, (c.logprobs or [])[toks : toks + len(new_ids)], k)
                totals["completion"] += len(new_ids)
                sent[c.index] = [chars + len(text), len(c.token_ids)]
                streamed = calls_sent.setdefault(c.index, [])
                if not newly_done:
                    if text or logprobs is not None:
                        chunks.append(delta(c.index, {"content": text}, logprobs))
                    if parser and hold is not None:
                        for i, (name, arguments) in enumerate(streamed_calls(parser, c.text[hold:])):
                            for d in _call_deltas(streamed, i, name, arguments):
                                chunks.append(delta(c.index, {"tool_calls": [d]}))
                    continue
                done.add(c.index)
                content, calls = parse_tool_calls(parser, c.text) if parser else (c.text, [])
                if calls:  # what was sent is a prefix of the content: send the rest, then the calls
                    rest = (content or "")[chars:]
                    if rest or logprobs is not None:
                        chunks.append(delta(c.index, {"content": rest}, logprobs))
                    for i, call in enumerate(calls):
                        for d in _call_deltas(streamed, i, call.name, call.arguments):
                            chunks.append(delta(c.index, {"tool_calls": [d]}))
                    chunks.append(delta(c.index, {}, None, "tool_calls", c.stop_reason))
                else:
                    text = c.text[chars:]
                    body = {"content": text} if text else {}
                    chunks.append(delta(c.index, body, logprobs, c.finish_reason, c.stop_reason))
            return chunks

        def usage_chunk():
            return {**chunk([]), "usage": self._usage(prompt_tokens, totals["completion"])}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _SSEResponse(self._stream_events(out, rids, on_output, usage_chunk, include_usage))

    def _tool_setup(self, req: ChatCompletionRequest) -> _ToolSetup | None:
        """How this request uses tools: None when it does not (no tools, tool_choice "none", or
        the server's parser is "none" with tool_choice "auto")."""
        choice = req.tool_choice
        if choice is None:
            choice = "auto" if req.tools else "none"
        named: str | None = None
        if isinstance(choice, dict):
            fn = choice.get("function")
            if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request(
                    "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
                    param="tool_choice",
                )
            named = fn["name"]
        elif choice not in ("none", "auto", "required"):
            raise bad_request(
                f"tool_choice {choice!r} is not one of 'none', 'auto', 'required' or a named function",
                param="tool_choice",
            )
        if choice == "none" or (not req.tools and choice == "auto"):
            return None
        if not req.tools:
            raise bad_request(f"tool_choice {choice!r} needs tools", param="tool_choice")
        try:
            functions = validate_tools(req.tools)
        except ValueError as e:
            raise bad_request(str(e), param="tools") from None
        template = getattr(self.tokenizer, "chat_template", None) if self.tokenizer is not None else None
        if not isinstance(template, str) or "tools" not in template:
            raise bad_request(
                f"the chat template of {self.model_path!r} does not render tools, so the model cannot see them; "
                "serve a checkpoint whose template does (Llama 3.1+, Hermes, Qwen 2.5)",
                param="tools",
            )
        if named is not None and named not in functions:
            raise bad_request(
                f"tool_choice names {named!r}, which is not among the tools ({', '.join(functions)})",
                param="tool_choice",
            )
        forced = None
        if choice == "required" or named is not None:
            if self.tool_parser == "none":
                raise bad_request(
                    "tool_choice 'required' or a named function needs a tool call parser (--tool-call-parser)",
                    param="tool_choice",
                )
            if req.structured_outputs_params() is not None:
                raise bad_request(
                    "tool_choice 'required' or a named function already constrains the output; drop "
                    "response_format / guided_* / structured_outputs",
                    param="tool_choice",
                )
            forced = forced_call_grammar(self.tool_parser, functions, named, req.parallel_tool_calls)
        if self.tool_parser == "none":
            return _ToolSetup(req.tools, None, None)
        return _ToolSetup(req.tools, self.tool_parser, forced)

    def _chat_prompt(self, req: ChatCompletionRequest, tools: _ToolSetup | None = None) -> list[int]:
        return self._render_chat(req.messages, req.add_generation_prompt, tools.tools if tools else None)

    def _render_chat(self, chat: list[ChatMessage], add_generation_prompt: bool, tools: list[dict] | None) -> list[int]:
        """The token ids of chat messages through the model's chat template; tools (OpenAI's
        function list) go to the template as transformers passes them."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(
                f"the checkpoint {self.model_path!r} has no chat template; use /v1/completions", param="messages"
            )
        messages = []
        for i, m in enumerate(chat):
            if m.role not in CHAT_ROLES:
                raise bad_request(
                    f"messages.{i}.role: {m.role!r} is not a role; use one of {', '.join(CHAT_ROLES)}",
                    param=f"messages.{i}.role",
                )
            content = m.content
            if isinstance(content, list):  # content parts: text only
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise bad_request(
                            f"messages.{i}.content: only text parts are supported, got {part.get('type')!r}",
                            param=f"messages.{i}.content",
                        )
                    texts.append(part["text"])
                content = "\n".join(texts)
            msg: dict = {"role": m.role, "content": content or ""}
            if m.name:
                msg["name"] = m.name
            if m.tool_calls:
                try:
                    msg["tool_calls"] = render_message_tool_calls(m.tool_calls)
                except ValueError as e:
                    raise bad_request(f"messages.{i}.{e}", param=f"messages.{i}.tool_calls") from None
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            messages.append(msg)
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True
            )
        except Exception as e:  # the template itself refuses (a role it does not know, ...)
            raise bad_request(f"the chat template could not render these messages: {e}", param="messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _chat_logprobs(self, token_ids, lps: list[LogprobsDict] | None, k: int) -> dict:
        content = []
        for tid, lp in zip(token_ids, lps or []):
            s = self._token_str(lp, tid)
            top = sorted((v for v in lp.values() if v.rank is not None and v.rank <= k), key=lambda v: v.rank or 0)[:k]
            top_ids = {id(v): t for t, v in lp.items()}
            content.append(
                {
                    "token": s,
                    "logprob": lp[tid].logprob if tid in lp else None,
                    "bytes": list(s.encode("utf-8")),
                    "top_logprobs": [
                        {
                            "token": self._token_str(lp, top_ids[id(v)]),
                            "logprob": v.logprob,
                            "bytes": list(self._token_str(lp, top_ids[id(v)]).encode("utf-8")),
                        }
                        for v in top
                    ],
                }
            )
        return {"content": content}

    # --- /v1/embeddings -----------------------------------------------------------------------
    async def embeddings(self, request: Request):
        """The prompt's final hidden states (after the final norm), mean- or last-token-pooled and
        L2-normalised: a causal LM's states, not a trained embedding model's."""
        arrival = time.monotonic()
        req = await _parse(request, EmbeddingRequest, self.limits.max_body_bytes)
        self._check_model(req.model)
        if req.encoding_format not in ("float", "base64"):
            raise bad_request(
                f"encoding_format {req.encoding_format!r} is not supported; use 'float' or 'base64'",
                param="encoding_format",
            )
        if req.dimensions is not None:
            raise bad_request(
                "dimensions is not supported: the embeddings have the model's hidden size (a causal LM's states "
                "cannot be shortened meaningfully)",
                param="dimensions",
            )
        try:
            pooling = PoolingParams(pooling=req.pooling)
        except ValidationError as e:
            raise from_validation_error(e) from None
        prompts = self._completion_prompts(req.input, param="input")
        for _, ids in prompts:
            self._max_tokens(None, len(ids), "input")
        base_id = f"embd-{uuid.uuid4().hex}"
        out, rids = await self._submit(prompts, pooling, base_id, arrival, False)
        final = await self._collect(out, rids, request)
        data = []
        for i, rid in enumerate(rids):
            vector = final[rid].embedding
            assert vector is not None  # a finished embedding request has one
            encoded = (
                base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode()
                if req.encoding_format == "base64"
                else vector
            )
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        return {
            "object": "list",
            "data": data,
            "model": self.model_name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }

    # --- /tokenize, /detokenize (vLLM's shapes) -----------------------------------------------
    async def tokenize(self, request: Request):
        req = await _parse(request, TokenizeRequest, self.limits.max_body_bytes)
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give either prompt (text) or messages (chat), not both and not neither", param="prompt")
        if req.messages is not None:
            if not req.messages:
                raise bad_request("messages must not be empty", param="messages")
            ids = self._render_chat(req.messages, req.add_generation_prompt, None)
        else:
            ids = self._encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    async def detokenize(self, request: Request):
        req = await _parse(request, DetokenizeRequest, self.limits.max_body_bytes)
        self._check_model(req.model)
        if self.tokenizer is None:
            raise bad_request(f"the checkpoint {self.model_path!r} has no tokenizer", param="tokens")
        vocab = len(self.tokenizer)
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"tokens: {bad} is not a token id (ids are 0 to {vocab - 1})", param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    # --- the rest -----------------------------------------------------------------------------
    async def models(self, request: Request):
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "llama3-dist",
                    "root": self.model_path,
                    "max_model_len": self.max_model_len,
                }
            ],
        }

    async def health(self, request: Request):
        recovering = self.engine.recovering
        if recovering is not None and self.engine.is_alive:
            return JSONResponse({"status": "recovering", "error": recovering}, status_code=503)
        if self.engine.is_alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse(
            {"status": "dead", "error": self.engine.error or "the engine thread has stopped"}, status_code=503
        )

    async def ping(self, request: Request):
        """Liveness: the process answers (readiness, the engine's state, is /health)."""
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request):
        return PlainTextResponse(
            render_metrics(self.engine, self.model_name), media_type="text/plain; version=0.0.4; charset=utf-8"
        )


async def _parse(request: Request, model: type[BaseModel], max_body_bytes: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
        raise _too_large(int(declared), max_body_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it comes: a body without a length is bounded too
        size += len(chunk)
        if size > max_body_bytes:
            raise _too_large(size, max_body_bytes)
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body has {'more than ' if size > limit else ''}{size} bytes; this server accepts at most "
        f"{limit} (--max-body-bytes)",
        "invalid_request_error",
        None,
        "request_too_large",
    )


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _call_deltas(streamed: list[tuple[str, str]], index: int, name: str, arguments: str) -> list[dict]:
    """The tool_calls deltas that bring call `index` of a streamed choice to (name, arguments),
    OpenAI's way: id, type and name first (with empty arguments), then the arguments in pieces.
    `streamed` holds (call id, arguments sent) per call and is updated."""
    deltas = []
    if index == len(streamed):
        streamed.append((new_call_id(), ""))
        head = {"index": index, "id": streamed[index][0], "type": "function"}
        deltas.append({**head, "function": {"name": name, "arguments": ""}})
    call_id, sent = streamed[index]
    if not arguments.startswith(sent):  # cannot happen: parsed calls keep their written text
        logger.error("tool call %s: arguments %r do not continue the %r already streamed", call_id, arguments, sent)
        return deltas
    if len(arguments) > len(sent):
        deltas.append({"index": index, "function": {"arguments": arguments[len(sent) :]}})
        streamed[index] = (call_id, arguments)
    return deltas


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _SSEResponse(StreamingResponse):
    """A server-sent event stream that always watches for the client leaving and always closes
    its generator (so the generator's cleanup, which aborts the requests, runs at once)."""

    def __init__(self, content):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def __call__(self, scope, receive, send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, watch):
                task.cancel()
            await asyncio.gather(stream, watch, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # an async generator
        error = None if stream.cancelled() else stream.exception()
        if isinstance(error, Exception) and not isinstance(error, OSError):  # a bug, not a client that left
            raise error


class _APIKeyMiddleware:
    """Requests to the API (/v1/..., and /metrics when asked) must carry 'Authorization: Bearer
    <key>', compared in constant time; /health and /metrics stay open for probes and scrapers,
    which send no token (as in vLLM). Pure ASGI: leaves streams alone."""

    def __init__(self, app, api_key: str, protect_metrics: bool = False):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = {"/health", "/ping"} | (set() if protect_metrics else {"/metrics"})

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") not in self.open_paths:
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                err = APIError(
                    401,
                    "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                    "invalid_request_error",
                    None,
                    "invalid_api_key",
                )
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


def build_app(
    engine: EngineClient,
    served_model_name: str | None = None,
    api_key: str | None = None,
    protect_metrics: bool = False,
    limits: ServerLimits | None = None,
    tool_call_parser: str = "auto",
) -> FastAPI:
    """The routes over an engine client. api_key guards /v1/* (and /metrics with protect_metrics);
    /health and /ping (liveness: 200 while the process serves) never need it.
    tool_call_parser: how tool calls are found in the output (tool_calls.TOOL_CALL_PARSERS)."""
    server = OpenAIServer(engine, served_model_name, api_key, limits, tool_call_parser)
    app = FastAPI(title="llama3-dist", description="OpenAI-compatible API for Llama 3 family checkpoints")
    app.state.server = server
    app.add_api_route("/v1/completions", server.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", server.embeddings, methods=["POST"])
    app.add_api_route("/v1/models", server.models, methods=["GET"])
    app.add_api_route("/tokenize", server.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", server.detokenize, methods=["POST"])
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/ping", server.ping, methods=["GET"])
    app.add_api_route("/metrics", server.metrics, methods=["GET"])

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key, protect_metrics=protect_metrics)
    return app


# ============================================================================ running it
def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one (read it with sock.getsockname()[1])."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def server_url(host: str, port: int) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def serve(
    model: str | Path | None = None,
    *,
    engine_kwargs: dict | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    log_level: str = "info",
    protect_metrics: bool = False,
    limits: ServerLimits | None = None,
    drain_timeout_s: float = 30.0,
    tool_call_parser: str = "auto",
) -> None:
    """Loads the model, then serves until interrupted (the `llama3-dist serve` command). SIGTERM
    or Ctrl-C drains: the socket stops accepting, requests under way finish (for at most
    drain_timeout_s, then they are cut), and the process exits 0."""
    import uvicorn

    from ..engine import LLMEngine

    sock = bind_socket(host, port)  # first: a taken port fails before minutes of loading
    engine = AsyncLLMEngine(LLMEngine(model, **(engine_kwargs or {})))
    try:
        name = served_model_name or (str(model) if model is not None else DEFAULT_MODEL_NAME)
        app = build_app(engine, name, api_key, protect_metrics, limits, tool_call_parser)
        url = server_url(host, sock.getsockname()[1])
        print(f"llama3-dist: serving {name!r} at {url}/v1", flush=True)
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=max(1, round(drain_timeout_s)))
        # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal to the handler it found: ours
        # turns SIGTERM into a clean exit (status 0) instead of death by the signal.
        signal.signal(signal.SIGTERM, _terminated)
        with contextlib.suppress(KeyboardInterrupt, _Terminated):
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.shutdown()
        sock.close()


class _Terminated(Exception):
    """SIGTERM, once uvicorn has drained."""


def _terminated(signum, frame) -> None:
    raise _Terminated


class ServerThread:
    """A server on its own thread in this process (tests, examples): `with ServerThread(engine) as s:
    s.base_url`. Binds 127.0.0.1 on a free port unless told otherwise."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        served_model_name: str | None = None,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        protect_metrics: bool = False,
        limits: ServerLimits | None = None,
        tool_call_parser: str = "auto",
    ):
        import uvicorn

        self.engine = engine
        self.app = build_app(engine, served_model_name, api_key, protect_metrics, limits, tool_call_parser)
        self.sock = bind_socket(host, port)
        self.url = server_url(host, self.sock.getsockname()[1])
        self.base_url = self.url + "/v1"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="llama3-dist-http", daemon=True
        )

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start within {timeout:g} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
