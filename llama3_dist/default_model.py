"""The embedded default model: a small random Llama 3 checkpoint with the real Llama 3 tokenizer.

It lets every command run on a fresh machine with no downloads. It is built once with
transformers into a cache directory and reused; its text is gibberish (the weights are random)
but every code path a real checkpoint takes (loading, tokenizing, sharding, generating) runs.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .paths import cache_root

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


def default_model_path() -> str:
    """The default checkpoint directory, built on first use (atomically, so concurrent first
    uses never see half a checkpoint)."""
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
