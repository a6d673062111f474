"""Constrained decoding on the driver: grammars compiled (and cached) with llguidance, one matcher
per constrained sequence, and each step's allowed tokens as a packed bitmask.

    StructuredOutputsParams -> grammar_key() -> GrammarCompiler.compile (LRU cache, thread pool)
        -> GrammarCompiler.matcher(): one GrammarMatcher per sequence (n > 1: one each)
    per step: fill_bitmask(matchers) -> int32 words [R, ceil(V / 32)], bit t of row r set when
        token t is allowed -> SamplingMetadata.allowed_* -> model/sampler.py masks the logits
    after the step: GrammarMatcher.accept(token); stopped() -> the sequence finishes with "stop"

Why llguidance rather than xgrammar (figures in README.md and benchmarks/results/): its grammars
build in milliseconds (the lexer and parser work lazily), so a cold request waits little; it fills
a batch's masks in parallel; and it refuses JSON-schema keywords it does not implement ("not",
"if"/"then", ...) with a message, where xgrammar ignores them and its output might not validate.
xgrammar's masks are faster per row.

The matchers live on the driver, which knows every sequence's tokens: a matcher has accepted
exactly the sequence's output tokens so far. Preemption and executor rebuilds recompute the K/V of
those same tokens and sample the next one after them, so the matcher needs no rollback.
No torch here (core/ stays torch-free).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..sampling_params import StructuredOutputsParams


class GrammarError(ValueError):
    """A schema, regex or grammar the engine cannot compile, with llguidance's reason."""


def _require_llguidance():
    try:
        import llguidance
        import llguidance.hf
        import llguidance.numpy
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "structured outputs (response_format, guided_*, structured_outputs, tool_choice 'required' or a "
            "named function) need llguidance: pip install 'llama3-dist[structured]'"
        ) from e
    return llguidance


@dataclass(frozen=True, slots=True)
class GrammarKey:
    """What identifies a compiled grammar: the kind and its canonical text."""

    kind: str  # StructuredOutputsParams.kind: json, json_object, regex, choice or grammar
    text: str


def grammar_key(spec: StructuredOutputsParams) -> GrammarKey:
    """The cache key of a request's constraint (JSON schemas canonical: key order and spacing do
    not make a new grammar)."""
    return GrammarKey(spec.kind, spec.text)


def _grammar_text(key: GrammarKey) -> str:
    """llguidance's grammar for a key. JSON comes out compact ("," and ":" with no spaces): any
    whitespace between tokens would let a model pad without end."""
    import llguidance

    if key.kind in ("json", "json_object"):
        schema = key.text if key.kind == "json" else '{"type": "object"}'
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    fmt = {"regex": "regex", "choice": "choice", "grammar": "grammar"}[key.kind]
    return llguidance.grammar_from(fmt, key.text)  # type: ignore[arg-type]


class GrammarMatcher:
    """One sequence's position in its grammar."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: Any):
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advances past a sampled token; False if the grammar refuses it (then the matcher is
        stopped: only a mask bug could get here)."""
        return bool(self._matcher.consume_token(token_id))

    def stopped(self) -> bool:
        """The grammar is complete (its end-of-sequence token was accepted, or nothing may follow)."""
        return bool(self._matcher.is_stopped())

    def error(self) -> str:
        return str(self._matcher.get_error())


class GrammarCompiler:
    """Compiles grammars for one tokenizer: an LRU cache by GrammarKey, a thread pool so callers
    can compile off their loop, and the batched mask fill. Thread-safe."""

    def __init__(self, tokenizer: Any, eos_token_id: int | None, cache_size: int = 256, num_threads: int = 2):
        self._hf_tokenizer = tokenizer
        self._eos = eos_token_id
        self.vocab_size = len(tokenizer)
        self._llg_tokenizer: Any = None
        self._executor: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarKey, Future] = OrderedDict()
        self._cache_size = cache_size
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="llama3-dist-grammar")
        # Its own thread, so that a long compile on the pool never delays a step's masks.
        self._fill_thread = ThreadPoolExecutor(1, thread_name_prefix="llama3-dist-grammar-fill")
        self._num_threads = num_threads

    def _tokenizer(self) -> Any:
        """llguidance's view of the vocabulary: ~2 s to build, so once, on first use."""
        with self._lock:
            if self._llg_tokenizer is None:
                llguidance = _require_llguidance()
                self._llg_tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos
                )
                self._executor = llguidance.LLExecutor(num_threads=self._num_threads)
            return self._llg_tokenizer

    def compile_async(self, key: GrammarKey) -> Future:
        """A future of the compiled grammar (a prototype matcher), shared by every caller with the
        same key; failed compiles stay cached too (the same bad schema fails fast)."""
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._build, key)
            self._cache[key] = fut
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return fut

    def compile(self, key: GrammarKey) -> None:
        """Compiles (or finds) the grammar; raises GrammarError naming the problem."""
        self.compile_async(key).result()

    def _build(self, key: GrammarKey) -> Any:
        import llguidance

        tokenizer = self._tokenizer()
        try:
            grammar = _grammar_text(key)
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
            if failed:
                raise GrammarError(f"invalid {_kind_name(key.kind)}: {'; '.join(messages)}".strip())
            matcher = llguidance.LLMatcher(tokenizer, grammar)
            if matcher.is_error():
                raise GrammarError(f"invalid {_kind_name(key.kind)}: {matcher.get_error()}")
        except GrammarError:
            raise
        except Exception as e:  # llguidance's own refusals (a GBNF rule not defined, ...): the input's fault
            raise GrammarError(f"invalid {_kind_name(key.kind)}: {e}") from None
        return matcher

    def matcher(self, key: GrammarKey) -> GrammarMatcher:
        """A fresh matcher at the grammar's start (compiles first if needed)."""
        prototype = self.compile_async(key).result()
        return GrammarMatcher(prototype.deep_copy())

    def fill_bitmask_async(self, matchers: Sequence[GrammarMatcher], num_words: int) -> PendingBitmask:
        """fill_bitmask on the fill thread: the engine launches the forward pass meanwhile and
        the sampler waits for the masks only when it needs them. The matchers must not be
        touched (accept) until the result is taken."""
        return PendingBitmask(self._fill_thread.submit(self.fill_bitmask, list(matchers), num_words))

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher], num_words: int) -> np.ndarray:
        """int32 [len(matchers), num_words]: row i has bit t set when matchers[i] allows token t.
        Words past the tokenizer's vocabulary (padding rows of the logits) stay 0: never allowed."""
        import llguidance.numpy

        self._tokenizer()
        own_words = (self.vocab_size + 31) // 32
        if num_words < own_words:
            raise ValueError(f"a bitmask of {num_words} words cannot hold a vocabulary of {self.vocab_size} tokens")
        mask = np.zeros((len(matchers), own_words), np.int32)
        llguidance.numpy.fill_next_token_bitmask_par(
            self._executor, [(m._matcher, i) for i, m in enumerate(matchers)], mask
        )
        if num_words == own_words:
            return mask
        padded = np.zeros((len(matchers), num_words), np.int32)
        padded[:, :own_words] = mask
        return padded


class PendingBitmask:
    """A step's grammar bitmask being filled on the driver while the step's forward pass runs
    (SamplingMetadata.allowed_bitmask). The sampler takes it with result(). Pickled (a Ray rank
    samples), it waits and travels as the array itself, so a remote rank never sees this type."""

    __slots__ = ("_future",)

    def __init__(self, future: Future):
        self._future = future

    def result(self) -> np.ndarray:
        return self._future.result()

    def failure(self) -> BaseException | None:
        """Waits for the fill; its exception, or None when it filled the masks."""
        return self._future.exception()

    def __reduce__(self):
        return (np.asarray, (self.result(),))


def _kind_name(kind: str) -> str:
    return {
        "json": "JSON schema",
        "json_object": "JSON object grammar",
        "regex": "regex",
        "choice": "choice list",
        "grammar": "grammar (EBNF/GBNF or Lark)",
    }[kind]


_compilers: dict[tuple[str, int, int | None], GrammarCompiler] = {}
_compilers_lock = threading.Lock()


def shared_compiler(tokenizer: Any, eos_token_id: int | None) -> GrammarCompiler:
    """One compiler per tokenizer in this process, so the HTTP server's compile (done off the
    engine's loop, to answer a bad schema with a 400) is the engine's cache hit."""
    key = (str(getattr(tokenizer, "name_or_path", id(tokenizer))), len(tokenizer), eos_token_id)
    with _compilers_lock:
        compiler = _compilers.get(key)
        if compiler is None:
            compiler = _compilers[key] = GrammarCompiler(tokenizer, eos_token_id)
        return compiler
