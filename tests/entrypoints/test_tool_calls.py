"""The tool-call parsers and grammars on exact strings (the server tests drive them end to end)."""

from __future__ import annotations

import json

import pytest

from llama3_dist.entrypoints.tool_calls import (
    ToolCall,
    forced_call_grammar,
    may_start_call,
    parse_tool_calls,
    resolve_parser,
    streamed_calls,
)


def test_llama3_json_calls():
    one = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert parse_tool_calls("llama3_json", one) == (None, [ToolCall("get_weather", '{"city": "Paris"}')])
    tagged = '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}'
    assert parse_tool_calls("llama3_json", tagged) == (None, [ToolCall("a", "{}"), ToolCall("b", '{"x": 1}')])
    lines = 'Let me check.\n{"name": "a", "arguments": {"k": [1, 2]}}\n{"name": "b", "parameters": {}}\n'
    assert parse_tool_calls("llama3_json", lines) == (
        "Let me check.\n",
        [ToolCall("a", '{"k": [1, 2]}'), ToolCall("b", "{}")],
    )
    for text in ("Hello there", '{"name": "a"}', '{"name": "a", "parameters": {}} and more', '{"name": "a", "par'):
        assert parse_tool_calls("llama3_json", text) == (text, [])


def test_hermes_calls():
    text = (
        'Sure.<tool_call>\n{"name": "a", "arguments": {"q": "x"}}\n</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    )
    assert parse_tool_calls("hermes", text) == ("Sure.", [ToolCall("a", '{"q": "x"}'), ToolCall("b", "{}")])
    trailing = '<tool_call>{"name": "a", "arguments": {}}</tool_call> tail'
    for bad in ("no calls", "<tool_call>{not json}</tool_call>", trailing):
        assert parse_tool_calls("hermes", bad) == (bad, [])


def test_streamed_calls_grow_into_the_parsed_calls():
    """Every prefix of a text names the calls begun so far with arguments that the final parse
    continues (strings with braces and escapes inside, nested objects, both formats)."""
    texts = {
        "llama3_json": '<|python_tag|>{"name": "a", "parameters": {"q": "}{\\"", "n": [1, {"b": 2}]}}; '
        '{"name": "b", "parameters": {}}',
        "hermes": 'Sure.<tool_call>\n{"name": "a", "arguments": {"q": "x"}}\n</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {"k": [true]}}</tool_call>',
    }
    for parser, text in texts.items():
        _content, final = parse_tool_calls(parser, text)
        hold = may_start_call(parser, text)
        assert hold is not None and len(final) == 2
        seen = []
        for end in range(hold, len(text) + 1):
            calls = streamed_calls(parser, text[hold:end])
            assert len(calls) >= len(seen)
            for (name, arguments), call in zip(calls, final):
                assert name == call.name and call.arguments.startswith(arguments)
            seen = calls
        assert seen == [(c.name, c.arguments) for c in final]
    assert streamed_calls("llama3_json", '{"name": "a", "parameters": ') == []  # no argument written yet


def test_where_a_streamed_call_may_start():
    assert may_start_call("llama3_json", "  {") == 0
    assert may_start_call("llama3_json", "Hello") is None
    assert may_start_call("hermes", "Sure <tool_") == 5
    assert may_start_call("hermes", "Sure <tool_call>{") == 5
    assert may_start_call("hermes", "a < b") is None


def test_parser_choice_and_forced_grammars():
    assert resolve_parser("auto", "{% for m in messages %}<tool_call>{% endfor %}") == "hermes"
    assert resolve_parser("auto", "{{ '<|python_tag|>' }}") == "llama3_json"
    with pytest.raises(ValueError, match="mistral"):
        resolve_parser("mistral", None)
    functions = {"f": {"type": "object", "properties": {"a": {"type": "integer"}}}, "g": {"type": "object"}}
    spec = forced_call_grammar("hermes", functions, "f", parallel=False)
    assert spec.grammar is not None and spec.grammar.startswith('start: "<tool_call>\\n" call "\\n</tool_call>"\n')
    schema = json.loads(spec.grammar.split("call: %json ", 1)[1])
    assert schema["properties"]["name"] == {"const": "f"} and "arguments" in schema["properties"]
    both = json.loads(forced_call_grammar("llama3_json", functions, None, parallel=True).grammar.split("%json ", 1)[1])
    assert [v["properties"]["name"]["const"] for v in both["anyOf"]] == ["f", "g"]
