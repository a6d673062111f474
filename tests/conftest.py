"""Shared fixtures: small random checkpoints of every supported architecture, built with
transformers and saved with save_pretrained, and one Ray instance per test session."""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import pytest
import torch
import transformers

from llama3_dist.default_model import TOKENIZER_DIR, TOKENIZER_FILES

# Tests that name no model get the embedded random one whatever is installed (the real default,
# SmolLM2, is tested by name); set here so that child processes and Ray workers inherit it.
os.environ["LLAMA3_DIST_DEFAULT_MODEL"] = "random"

COMMON = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    num_hidden_layers=2,
    vocab_size=130,
    max_position_embeddings=512,
    initializer_range=0.1,
)

# name -> (config class, model class, config overrides): each exercises what its family adds.
ARCHITECTURES = {
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        ),
    ),
    "llama32": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, head_dim=32)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=24, rope_theta=1e6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rms_norm_eps=1e-6)),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(
            embedding_multiplier=12.0,
            attention_multiplier=0.1,
            residual_multiplier=0.22,
            logits_scaling=16.0,
            tie_word_embeddings=True,
        ),
    ),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(clip_qkv=0.3)),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            max_position_embeddings=256,
            original_max_position_embeddings=64,
            partial_rotary_factor=0.75,
            head_dim=16,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(6)],
                "long_factor": [2.0 + 0.5 * i for i in range(6)],
            },
            sliding_window=None,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}


def pytest_collection_modifyitems(config, items):
    """Tests that use the session's Ray are `ray` tests; `gpu` tests skip without a GPU. The fast
    lane is `pytest -m "not slow and not ray and not subprocess and not gpu"`."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


def build_checkpoint(arch: str, path, **overrides) -> str:
    """Saves a random float32 checkpoint of `arch` to `path` and returns the path."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(zlib.crc32(arch.encode()))
    getattr(transformers, model_cls)(config).eval().save_pretrained(path)
    return str(path)


def mapped_files(directory) -> set[str]:
    """The files under `directory` that this process has memory-mapped (Linux: /proc/self/maps;
    elsewhere nothing is reported)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return set()
    root = str(Path(directory).resolve())
    return {line.split(maxsplit=5)[5].strip() for line in maps.read_text().splitlines() if root in line}


def load_reference(path):
    """The transformers model for a checkpoint directory, float32, eager attention."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """arch name -> checkpoint directory, built once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: build_checkpoint(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def references(checkpoints):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = load_reference(checkpoints[arch])
        return cache[arch]

    return get


def build_tokenized_checkpoint(path, **overrides) -> str:
    """A tiny random Llama 3 with the real Llama 3 vocabulary and tokenizer (chat template
    included): for text, stop strings, chat and the server."""
    build_checkpoint(
        "llama",
        path,
        **{
            **dict(
                vocab_size=128256, bos_token_id=128000, eos_token_id=[128001, 128008, 128009], tie_word_embeddings=True
            ),
            **overrides,
        },
    )
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, Path(path) / name)
    return str(path)


@pytest.fixture(scope="session")
def tokenized_checkpoint(tmp_path_factory):
    return build_tokenized_checkpoint(tmp_path_factory.mktemp("tokenized") / "llama3-tiny")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (it takes 5-10 s to start); RayExecutors
    reuse a Ray that is already initialised and leave it running at close. address="local":
    a plain ray.init() may try to join a dead cluster named in a stale session file."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=256 << 20)
    yield ray
    if started:
        ray.shutdown()


def paged_cache(lens, block_size, hk, d, dtype, device, pad_value):
    """K/V caches holding random K/V for sequences of `lens` tokens on shuffled blocks.

    Block 0 and a few spare blocks belong to no sequence, and the tail of every last block is
    unwritten: all hold NaN, so a kernel that reads them fails. Block tables are padded with
    pad_value (0 points at the NaN block 0) past each sequence's blocks.
    """
    n_blocks = [-(-L // block_size) for L in lens]
    num_blocks = sum(n_blocks) + 3
    order = (torch.randperm(num_blocks - 1) + 1).tolist()
    k_cache = torch.full((num_blocks, block_size, hk, d), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))
    tables = torch.full((len(lens), max(n_blocks) + 2), pad_value, dtype=torch.int32)
    for b, (L, n) in enumerate(zip(lens, n_blocks)):
        blocks, order = order[:n], order[n:]
        tables[b, :n] = torch.tensor(blocks, dtype=torch.int32)
        flat_k = k_cache[blocks].flatten(0, 1)
        flat_v = v_cache[blocks].flatten(0, 1)
        flat_k[:L] = torch.randn(L, hk, d).to(dtype)
        flat_v[:L] = torch.randn(L, hk, d).to(dtype)
        k_cache[blocks] = flat_k.view(n, block_size, hk, d)
        v_cache[blocks] = flat_v.view(n, block_size, hk, d)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    return k_cache, v_cache, tables.to(device), lens_t
