"""Loading a checkpoint's Hugging Face tokenizer (or one converted from a GGUF file's metadata)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# tokenizer_config.json class names that AutoTokenizer resolves to the one generic class, the
# `tokenizers` backend (transformers 5 names it TokenizersBackend; PreTrainedTokenizerFast is the
# same class there and transformers 4's name): Llama 3's own files and every tokenizer we save.
_BACKEND_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | Path):
    """The Hugging Face tokenizer in a checkpoint directory (or converted from a GGUF file's
    metadata), or None if it has none."""
    from .model.gguf import find_gguf, load_gguf_tokenizer

    gguf_file = find_gguf(path)
    if gguf_file is not None:
        return load_gguf_tokenizer(gguf_file)
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return None
    return load_saved_tokenizer(path)


def load_saved_tokenizer(directory: Path):
    """AutoTokenizer.from_pretrained(directory), built as the class it would pick without asking it
    where that is the generic backend: to resolve a class name, AutoTokenizer first imports
    transformers' index of every model it has (~1.5 s on 2 cores, a quarter of the README's main
    job once everything else is cached)."""
    return _saved_tokenizer_class(directory).from_pretrained(str(directory))


def _saved_tokenizer_class(directory: Path) -> Any:
    try:
        name = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        name = None
    if name in _BACKEND_CLASSES:
        try:
            import transformers

            return getattr(transformers, name)
        except AttributeError:  # TokenizersBackend before transformers 5
            pass
    from transformers import AutoTokenizer

    return AutoTokenizer
