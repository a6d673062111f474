"""Tool calling for /v1/chat/completions: the tool-call formats models write, the parsers that
find calls in generated text, and the grammars that force a call for tool_choice "required" or a
named function (so the output always parses, whatever the weights).

Two formats:

- llama3_json (Llama 3.1 / 3.2 / 3.3): `{"name": "f", "parameters": {...}}`, optionally after
  <|python_tag|>, several separated by ";" or newlines.
- hermes (Hermes, Qwen 2.5): `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`, repeated.

`--tool-call-parser auto` picks hermes when the chat template writes <tool_call>, else llama3_json.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from ..sampling_params import StructuredOutputsParams

TOOL_CALL_PARSERS = ("auto", "llama3_json", "hermes", "none")
PYTHON_TAG = "<|python_tag|>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI sends it

    def to_openai(self, call_id: str) -> dict[str, Any]:
        return {"id": call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def resolve_parser(name: str, chat_template: str | None) -> str:
    """The parser for `--tool-call-parser name`: auto reads the chat template."""
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"tool call parser must be one of {', '.join(TOOL_CALL_PARSERS)}, got {name!r}")
    if name != "auto":
        return name
    return "hermes" if chat_template and "<tool_call>" in chat_template else "llama3_json"


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) from a completed text. No calls: (text, []). Calls: the text before
    them as content (None when blank). A text that looks like a call but does not parse is
    content: never a half-parsed call."""
    if parser == "hermes":
        return _parse_hermes(text)
    if parser == "llama3_json":
        return _parse_llama3_json(text)
    return text, []


def _call_from(obj: Any, arguments_key: str, text: str = "", start: int = 0) -> ToolCall | None:
    """The call in a parsed object, or None. text[start:] is where the object was written: when
    it begins with the name and then the arguments (how the forcing grammar writes it), the
    arguments are their written text, the very characters streaming sends; otherwise they are
    re-serialized."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters")))
    if not isinstance(args, dict):
        return None
    written = _scan_call(text, start)
    if written is not None and written.complete and written.name == obj["name"]:
        return ToolCall(obj["name"], written.arguments)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


# A call as models and the forcing grammar write it: the name first, then the arguments object.
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:parameters|arguments)"\s*:\s*')
_CALL_CLOSE = re.compile(r"\s*\}")  # the call object's end, after its arguments
_HERMES_OPEN = re.compile(r"<tool_call>\s*")


@dataclass(frozen=True, slots=True)
class _WrittenCall:
    name: str
    arguments: str  # the arguments object's text so far (all of it when complete)
    complete: bool  # the arguments object is closed
    end: int  # complete: the index just past the arguments object


def _scan_call(text: str, start: int) -> _WrittenCall | None:
    """The call whose text begins at text[start] (name first, then an arguments object), as far
    as it is written; None when the text there is not (yet) such a call's head."""
    head = _CALL_HEAD.match(text, start)
    if head is None:
        return None
    try:
        name = json.loads(f'"{head.group(1)}"')
    except json.JSONDecodeError:
        return None
    begin = head.end()
    if begin == len(text) or text[begin] != "{":
        return None
    depth, in_string, escaped = 0, False, False
    for i in range(begin, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return _WrittenCall(name, text[begin : i + 1], True, i + 1)
    return _WrittenCall(name, text[begin:], False, len(text))


def streamed_calls(parser: str, text: str) -> list[tuple[str, str]]:
    """(name, arguments so far) of each call begun in a streamed text (the part from
    may_start_call on), in order: a call counts once its name and the start of its arguments are
    written. The arguments grow as text arrives; parse_tool_calls on the final text gives the
    same calls with arguments that continue them."""
    calls: list[tuple[str, str]] = []
    if parser == "llama3_json":
        at = text.find(PYTHON_TAG)
        i = at + len(PYTHON_TAG) if at >= 0 else text.find("{")
        while 0 <= i < len(text):
            while i < len(text) and text[i] in " \t\r\n;":
                i += 1
            call = _scan_call(text, i)
            if call is None:
                break
            calls.append((call.name, call.arguments))
            close = _CALL_CLOSE.match(text, call.end) if call.complete else None
            if close is None:
                break
            i = close.end()
    elif parser == "hermes":
        for tag in _HERMES_OPEN.finditer(text):
            call = _scan_call(text, tag.end())
            if call is None:
                break
            calls.append((call.name, call.arguments))
            if not call.complete:
                break
    return calls


def _parse_llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    start = text.find(PYTHON_TAG)
    body_from = start + len(PYTHON_TAG) if start >= 0 else text.find("{")
    if body_from < 0:
        return text, []
    content = text[: start if start >= 0 else body_from]
    body = text[body_from:]
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    i = 0
    while True:
        while i < len(body) and body[i] in " \t\r\n;":
            i += 1
        if i == len(body):
            break
        try:
            start = i
            obj, i = decoder.raw_decode(body, i)
        except json.JSONDecodeError:
            return text, []
        call = _call_from(obj, "parameters", body, start)
        if call is None:
            return text, []
        calls.append(call)
    if not calls:
        return text, []
    return (content if content.strip() else None), calls


def _parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    first = text.find("<tool_call>")
    if first < 0:
        return text, []
    calls = []
    for m in _HERMES_CALL.finditer(text, first):
        try:
            call = _call_from(json.loads(m.group(1)), "arguments", text, m.start(1))
        except json.JSONDecodeError:
            return text, []
        if call is None:
            return text, []
        calls.append(call)
    rest = _HERMES_CALL.sub("", text[first:]).strip()
    if not calls or rest:
        return text, []
    content = text[:first]
    return (content if content.strip() else None), calls


def may_start_call(parser: str, text: str) -> int | None:
    """Where a tool call may begin in streamed text (what is before it can go out as content),
    or None when none can: the stream then holds the text from there until the end."""
    if parser == "llama3_json":
        stripped = text.lstrip()
        if not stripped:
            return None
        if stripped.startswith("{") or stripped.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(stripped):
            return 0
        tag = text.find(PYTHON_TAG)
        return tag if tag >= 0 else None
    if parser == "hermes":
        at = text.find("<tool_call>")
        if at >= 0:
            return at
        # a partial "<tool_call" at the end: hold it back until it is known
        for k in range(min(len(text), len("<tool_call>") - 1), 0, -1):
            if "<tool_call>".startswith(text[-k:]):
                return len(text) - k
        return None
    return None


def _function(tool: Any) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, dict) else None
    return fn if isinstance(fn, dict) else {}


def validate_tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> the function's parameters schema; ValueError naming the bad entry."""
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise ValueError(f"tools.{i}: only tools of type 'function' are supported")
        fn = _function(tool)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools.{i}.function.name must be a non-empty string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"tools.{i}.function.parameters must be a JSON schema object")
        out[name] = params
    return out


def forced_call_grammar(
    parser: str, functions: dict[str, dict[str, Any]], only: str | None, parallel: bool
) -> StructuredOutputsParams:
    """A grammar (llguidance's Lark, with JSON schemas inside) whose every text is one call, or
    several with `parallel`, to `only` or to any of `functions`, in the parser's format: what
    tool_choice "required" or a named function enforces."""
    names = [only] if only is not None else list(functions)
    key = "arguments" if parser == "hermes" else "parameters"
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, key: functions[name]},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for name in names
    ]
    schema: dict[str, Any] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    call = "call: %json " + json.dumps(schema)
    if parser == "hermes":
        one = '"<tool_call>\\n" call "\\n</tool_call>"'
        start = f'start: {one} ("\\n" {one})*' if parallel else f"start: {one}"
    else:
        start = 'start: call ("; " call)*' if parallel else "start: call"
    return StructuredOutputsParams(grammar=f"{start}\n{call}\n")


def render_message_tool_calls(tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant message's tool_calls for the chat template: arguments as an object (what
    Llama and Hermes templates serialise), as transformers expects."""
    out = []
    for i, call in enumerate(tool_calls):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise ValueError(f"tool_calls.{i} must be an object with a 'function' object")
        fn = dict(call["function"])
        args = fn.get("arguments")
        if isinstance(args, str):
            with contextlib.suppress(json.JSONDecodeError):  # else the template gets the text as it is
                fn["arguments"] = json.loads(args)
        out.append({**call, "function": fn})
    return out
