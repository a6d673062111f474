"""Incremental detokenization on the real Llama 3 tokenizer, compared with its full decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llama3_dist.core.detokenizer import IncrementalDetokenizer
from llama3_dist.sampling_params import SamplingParams

ASSET = Path(__file__).resolve().parents[2] / "llama3_dist" / "assets" / "llama3-tokenizer"
BOS, EOT = 128000, 128009
PROMPT = [BOS, 9906]  # "<|begin_of_text|>Hello"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(ASSET))


@pytest.fixture(scope="module")
def cases():
    return json.loads((ASSET / "cases.json").read_text())["random_sample"]


def stream(tok, ids, step=1, **kw):
    """Feed ids `step` at a time until a stop string or the end; returns the deltas and the
    detokenizer."""
    d = IncrementalDetokenizer(tok, PROMPT, **kw)
    deltas = []
    for i in range(0, len(ids), step):
        deltas.append(d.add_tokens(ids[i : i + step], final=i + step >= len(ids)))
        if d.finished:
            break
    return deltas, d


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("step", [1, 3])
def test_incremental_equals_full_decode(tok, cases, skip_special_tokens, step):
    multibyte = 0
    for case in cases:
        ids = case["ids"]
        full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
        deltas, d = stream(tok, ids, step, skip_special_tokens=skip_special_tokens)
        assert "".join(t.text for t in deltas) == full == d.text
        if "\ufffd" not in full:  # a character is never emitted in halves
            assert all("\ufffd" not in t.text for t in deltas)
        multibyte += any(len(tok.decode([i])) and "\ufffd" in tok.decode([i]) for i in ids)
    assert multibyte > 20  # the sample does split characters across tokens


def test_split_character_is_held_until_complete(tok):
    ids = tok.encode(" 🦙", add_special_tokens=False)
    assert len(ids) > 1 and "\ufffd" in tok.decode(ids[:1])  # the emoji spans tokens
    d = IncrementalDetokenizer(tok, PROMPT)
    # the leading space shares the emoji's first token, so nothing comes out before the last
    assert [d.add_tokens([i]).text for i in ids] == [""] * (len(ids) - 1) + [" 🦙"]


@pytest.mark.parametrize(
    "text, stop, include, want",
    [
        ("Hello world! More text", "ld! Mo", False, "Hello wor"),
        ("Hello world! More text", "ld! Mo", True, "Hello world! Mo"),
        ("I like 🦙 llamas a lot", "🦙 l", False, "I like "),
        ("I like 🦙 llamas a lot", "a l", True, "I like 🦙 llamas a l"),
        ("x = 1\n\n\ny = 2", "\n\n", False, "x = 1"),  # inside one token: its rest is dropped
    ],
)
def test_stop_strings_spanning_tokens(tok, text, stop, include, want):
    ids = tok.encode(text, add_special_tokens=False)
    spans = not any(stop in tok.decode([i]) for i in ids)
    assert spans == (stop != "\n\n")
    deltas, d = stream(tok, ids, stop=["never", stop], include_stop_str_in_output=include)
    assert d.finished and deltas[-1].stop == stop
    assert "".join(t.text for t in deltas) == d.text == want
    # nothing past the stop was ever emitted, even a token early
    for k in range(1, len(deltas)):
        assert want.startswith("".join(t.text for t in deltas[:k]))


def test_partial_stop_is_held_then_released(tok):
    text = "The end is near. The ending."
    ids = tok.encode(text, add_special_tokens=False)
    deltas, d = stream(tok, ids, stop=["The end."])
    assert d.text == text and deltas[-1].stop is None
    emitted = ""
    for delta, i in zip(deltas, range(len(ids))):
        emitted += delta.text
        so_far = tok.decode(ids[: i + 1])
        # held back exactly while the tail could still start "The end."
        assert so_far.startswith(emitted)
        held = so_far[len(emitted) :]
        assert held == "" or ("The end.".startswith(held) and not delta.stop)


def test_stop_terminated_and_special_tokens(tok):
    ids = [*tok.encode("Sure.", add_special_tokens=False), EOT]
    for include in (False, True):
        for skip in (True, False):
            d = IncrementalDetokenizer(tok, PROMPT, skip_special_tokens=skip, include_stop_str_in_output=include)
            for i in ids[:-1]:
                d.add_tokens([i])
            d.add_tokens([ids[-1]], stop_terminated=True)
            want = "Sure." + ("<|eot_id|>" if include and not skip else "")
            assert d.text == want and d.finished
    # a held partial stop string is released when the sequence ends on its length limit
    params = SamplingParams(stop=["Sure.!"])
    d = IncrementalDetokenizer.from_params(tok, PROMPT, params)
    assert d.add_tokens(ids[:-1]).text == ""
    assert d.add_tokens([], final=True).text == "Sure." == d.text
    with pytest.raises(RuntimeError):
        d.add_tokens([1])
