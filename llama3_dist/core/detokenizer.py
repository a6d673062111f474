"""Incremental detokenization of one sequence, with stop strings.

Each step decodes only a short window of ids (vLLM's prefix/read offsets): `prefix_offset` marks
context already emitted, `read_offset` the first id whose text is not yet emitted. Text is emitted
only when the window's decode does not end in U+FFFD, so a UTF-8 character split across tokens
comes out whole. Stop strings are searched in the new text plus the held-back tail; a tail that
could still grow into a stop string is held back until it either completes or cannot.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from ..sampling_params import SamplingParams

# Prompt ids kept as decoding context: enough for tokenizers whose first token's text depends on
# the one before (SentencePiece's leading space), as in vLLM.
INITIAL_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class Delta(NamedTuple):
    text: str  # new text, final: never retracted
    stop: str | None  # the stop string that ended the sequence, if one did


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ):
        # The Rust tokenizer's decode is ~2x cheaper than the transformers wrapper's.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._decode = backend.decode if backend is not None else tokenizer.decode
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_partial = max((len(s) for s in self.stop), default=1) - 1
        self._ids = list(prompt_token_ids[-INITIAL_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # decode of ids[prefix:read], cached
        self._held = ""  # decoded, but possibly the start of a stop string
        self.text = ""  # all text emitted so far
        self.finished = False

    @classmethod
    def from_params(cls, tokenizer, prompt_token_ids: Sequence[int], params: SamplingParams) -> IncrementalDetokenizer:
        return cls(
            tokenizer,
            prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )

    def add_tokens(
        self, token_ids: Iterable[int], *, final: bool = False, stop_terminated: bool = False, check_stops: bool = True
    ) -> Delta:
        """Feed newly generated ids; returns the text now known to be final.

        final: the sequence ends after these ids (length limit, stop token, abort), so nothing is
        held back any more. stop_terminated: the last id is an eos/stop token id that ended the
        sequence; its text is left out unless include_stop_str_in_output (vLLM). Implies final.
        check_stops=False (before min_tokens, as vLLM): stop strings in this text do not count.
        """
        if self.finished:
            raise RuntimeError("add_tokens after the sequence finished (a stop string or final)")
        ids = list(token_ids)
        if stop_terminated:
            final = True
            if ids and not self.include_stop_str_in_output:
                ids.pop()
        self._ids.extend(ids)
        return self._emit(self._decode_window(final), final, check_stops)

    def _decode_window(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(
                self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=self.skip_special_tokens
            )
        new_text = self._decode(self._ids[self._prefix_offset :], skip_special_tokens=self.skip_special_tokens)
        if len(new_text) <= len(self._prefix_text):
            return ""  # e.g. a skipped special token; keep it in the window
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""  # a character split across tokens: wait for its remaining bytes
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None
        return delta

    def _emit(self, new: str, final: bool, check_stops: bool) -> Delta:
        pending = self._held + new
        self._held = ""
        if self.stop and pending and check_stops:
            hit = _find_stop(pending, self.stop)
            if hit is not None:
                at, s = hit
                out = pending[: at + len(s)] if self.include_stop_str_in_output else pending[:at]
                self.text += out
                self.finished = True
                return Delta(out, s)
            if not final:
                # Everything before the tail is final; hold the tail that may start a stop.
                h = _partial_stop_len(pending, self.stop, self._max_partial)
                if h:
                    pending, self._held = pending[:-h], pending[-h:]
        self.text += pending
        self.finished = final
        return Delta(pending, None)


def _find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """The earliest stop string occurrence in text (the longest one if two start together)."""
    best: tuple[int, str] | None = None
    for s in stops:
        at = text.find(s)
        if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(s) > len(best[1]))):
            best = (at, s)
    return best


def _partial_stop_len(text: str, stops: Sequence[str], max_partial: int) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    for n in range(min(max_partial, len(text)), 0, -1):
        tail = text[-n:]
        if any(len(s) > n and s.startswith(tail) for s in stops):
            return n
    return 0
