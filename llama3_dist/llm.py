"""LLM: the offline batch API vLLM users know, built on LLMEngine."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

from .core.grammar import grammar_key
from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """LLM(model=checkpoint_dir, devices=["cpu", "cpu"], dtype="bfloat16"); model=None uses the
    embedded default. Other keyword arguments go to LLMEngine (max_num_seqs, kv_cache_bytes, ...)."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        devices: list[str] | None = None,
        dtype: str | None = None,
        tokenizer: str | Path | None = None,
        seed: int | None = None,
        **engine_kwargs,
    ):
        self.engine = LLMEngine(model, devices=devices, dtype=dtype, tokenizer=tokenizer, seed=seed, **engine_kwargs)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. sampling_params: one for all, or one per prompt."""
        if prompts is not None and prompt_token_ids is not None:
            raise ValueError("give prompts or prompt_token_ids, not both")
        if prompts is None and prompt_token_ids is None:
            raise ValueError("give prompts or prompt_token_ids")
        requests: list[tuple[str | None, list[int] | None]]
        if prompts is not None:
            requests = [(text, None) for text in ([prompts] if isinstance(prompts, str) else prompts)]
        else:
            assert prompt_token_ids is not None
            requests = [(None, list(ids)) for ids in prompt_token_ids]
        params = _per_prompt(sampling_params, len(requests))
        return self._run(self._add(requests, params), use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params=None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Renders each conversation with the tokenizer's chat template and generates."""
        conversations = cast(list[list[dict]], [messages] if messages and isinstance(messages[0], dict) else messages)
        token_ids = [self.apply_chat_template(c, add_generation_prompt, chat_template) for c in conversations]
        params = _per_prompt(sampling_params, len(token_ids))
        return self._run(self._add([(None, t) for t in token_ids], params), use_tqdm)

    def apply_chat_template(
        self, conversation: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None
    ) -> list[int]:
        return apply_chat_template(
            self.engine.tokenizer, self.engine.model_path, conversation, add_generation_prompt, chat_template
        )

    def generate_stream(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        prompt_token_ids: Sequence[int] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yields the request's cumulative RequestOutput after every step that advanced it; the last
        one has finished=True. Closing the generator early aborts the request."""
        [rid] = self._add(
            [(prompt, None if prompt_token_ids is None else list(prompt_token_ids))],
            [sampling_params or SamplingParams()],
        )
        finished = False
        try:
            while not finished:
                for out in self.engine.step():
                    if out.request_id == rid:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.engine.abort_request(rid)

    def _add(self, prompts: list[tuple[str | None, list[int] | None]], params: list[SamplingParams]) -> list[str]:
        """Adds every request or, if one is refused, none of them."""
        specs = {grammar_key(p.structured_outputs) for p in params if p.structured_outputs is not None}
        for key in specs:  # distinct grammars compile side by side on the compiler's threads
            self.engine.grammar_compiler().compile_async(key)
        ids = []
        try:
            for (text, tokens), p in zip(prompts, params):
                rid = str(next(self._ids))
                self.engine.add_request(rid, text, p, prompt_token_ids=tokens)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        pending = set(ids)
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while pending:
                for out in self.engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def apply_chat_template(
    tokenizer,
    model_path: str,
    conversation: list[dict],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
) -> list[int]:
    """The conversation rendered with the tokenizer's chat template (or chat_template), as token
    ids; shared by LLM.chat and the Ray Data processor so that both render alike."""
    if tokenizer is None or (chat_template is None and not getattr(tokenizer, "chat_template", None)):
        raise ValueError(f"the tokenizer of {model_path!r} has no chat template")
    ids = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True, chat_template=chat_template
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _per_prompt(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} prompts: give one, or one per prompt")
    return params
