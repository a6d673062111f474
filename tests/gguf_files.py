"""GGUF files for the tests, written as llama.cpp's converter writes them: q/k rows permuted, 2-D
weights quantized (gguf-py's quantizers; K-quants by the writers here, gguf-py has none), and
transformers' greedy tokens on such a file (the reference)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
# llama-quantize's Q4_K_M: Q4_K, with Q6_K for v and down (of some layers: here all) and the LM head
Q4_K_M_TYPES = {"attn_v": Q.Q6_K, "ffn_down": Q.Q6_K, "output": Q.Q6_K}

LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GLOBAL_PARTS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for q and k (what the loader must undo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_q4_k(w: np.ndarray, bits: int = 4) -> np.ndarray:
    """llama.cpp's Q4_K (or, bits 5, Q5_K) bytes [n, k / 256 * (144 or 176)] of w [n, k] (gguf-py
    writes no K-quants): per 256 values d, dmin (float16), 8 sub-blocks' 6-bit scales and
    minimums, (Q5_K: each value's fifth bit,) 4-bit values; w ~ d * sc * q - dmin * m."""
    n, k = w.shape
    top = 2**bits - 1
    sub = w.reshape(n, k // 256, 8, 32).astype(np.float32)
    low, high = np.minimum(sub.min(-1), 0), sub.max(-1)
    d = ((high - low) / top).max(-1) / 63
    dmin = (-low).max(-1) / 63
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    sc = np.clip(np.round((high - low) / top / np.maximum(d16, 1e-8)[..., None]), 0, 63).astype(np.uint8)
    m = np.clip(np.round(-low / np.maximum(dmin16, 1e-8)[..., None]), 0, 63).astype(np.uint8)
    step = np.maximum(d16[..., None] * sc.astype(np.float32), 1e-8)
    q = np.clip(np.round((sub + (dmin16[..., None] * m.astype(np.float32))[..., None]) / step[..., None]), 0, top)
    q = q.astype(np.uint8)
    packed = np.empty((n, k // 256, 12), np.uint8)
    packed[..., 0:4] = sc[..., 0:4] | (sc[..., 4:8] >> 4) << 6
    packed[..., 4:8] = m[..., 0:4] | (m[..., 4:8] >> 4) << 6
    packed[..., 8:12] = (sc[..., 4:8] & 0xF) | (m[..., 4:8] & 0xF) << 4
    nibbles = q & 0xF
    qs = (nibbles[:, :, 0::2] | nibbles[:, :, 1::2] << 4).reshape(n, k // 256, 128)  # chunk c: sub-blocks 2c, 2c+1
    # Q5_K: bit j of byte l is the fifth bit of value l of sub-block j.
    fifth = [] if bits == 4 else [sum(((q[:, :, j] >> 4) & 1) << j for j in range(8)).astype(np.uint8)]
    halves = [a.reshape(n, -1, 1).view(np.uint8) for a in (d16, dmin16)]
    return np.concatenate([*halves, packed, *fifth, qs], axis=2).reshape(n, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """llama.cpp's Q6_K bytes [n, k / 256 * 210] of w [n, k]: per 256 values 16 sub-blocks of 16
    with an int8 scale each, times a float16 d; 6-bit values q, w ~ d * sc * (q - 32)."""
    n, k = w.shape
    sub = w.reshape(n, k // 256, 16, 16).astype(np.float32)
    sub_scale = np.abs(sub).max(-1) / 31
    d = (sub_scale.max(-1) / 127).astype(np.float16)
    sc = np.clip(np.round(sub_scale / np.maximum(d, 1e-8)[..., None]), -128, 127).astype(np.int8)
    step = np.maximum(d[..., None] * sc.astype(np.float32), 1e-8)
    q = (np.clip(np.round(sub / step[..., None]) + 32, 0, 63)).astype(np.uint8).reshape(n, k // 256, 2, 128)
    a, b, c, e = (q[..., i : i + 32] for i in (0, 32, 64, 96))  # each half of 128: 4 runs of 32
    ql = np.concatenate([a & 0xF | (c & 0xF) << 4, b & 0xF | (e & 0xF) << 4], axis=3).reshape(n, -1, 128)
    qh = (a >> 4 | (b >> 4) << 2 | (c >> 4) << 4 | (e >> 4) << 6).reshape(n, -1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.reshape(n, -1, 1).view(np.uint8)], axis=2).reshape(n, -1)


def quantize(array: np.ndarray, qtype) -> np.ndarray:
    from gguf.quants import quantize as gguf_quantize

    writers = {Q.Q4_K: quantize_q4_k, Q.Q5_K: lambda w: quantize_q4_k(w, bits=5), Q.Q6_K: quantize_q6_k}
    return writers[qtype](array) if qtype in writers else gguf_quantize(array, qtype)


def write_gguf(hf_dir: Path, out: Path, qtype, architecture: str = "llama", types: dict | None = None) -> Path:
    """types: a GGUF tensor kind ("attn_v", "ffn_down", "output", ...) -> its type, else qtype."""
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    state = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    writer = GGUFWriter(str(out), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for name, tensor in state.items():
        array = tensor.numpy()
        if name in GLOBAL_PARTS:
            gguf_name = GLOBAL_PARTS[name]
        else:
            layer, part = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gguf_name = f"blk.{layer}.{LAYER_PARTS[part]}.weight"
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, config.num_attention_heads)
        if name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, config.num_key_value_heads)
        if array.ndim == 2:
            kind = (types or {}).get(gguf_name.split(".")[-2], qtype)
            writer.add_tensor(gguf_name, quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@contextlib.contextmanager
def transformers_reads_gguf_once() -> Iterator[None]:
    """Within this block transformers' GGUF loading parses each file's metadata once and builds
    gguf's tensor-name map once per (architecture, layers); its results are unchanged. Unpatched,
    it parses the metadata for the config, the tokenizer and the weights each (SmolLM2's
    49152-token vocabulary: ~7 s a time on 2 cores) and rebuilds the same name map for every one
    of the model's modules (~400 for SmolLM2: ~10 s)."""
    with pytest.MonkeyPatch.context() as patch:
        # transformers imports both names from gguf at each call, and passes the same path each time
        for name in ("GGUFReader", "get_tensor_name_map"):
            patch.setattr(gguf, name, functools.lru_cache(maxsize=None)(getattr(gguf, name)))
        yield


def transformers_greedy(file: Path) -> list[int]:
    with transformers_reads_gguf_once():
        model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    return out[0, len(PROMPT) :].tolist()


def save_small_llama(path: Path, hidden: int, heads: int, kv_heads: int, layers: int, seed: int) -> Path:
    """A random Llama (intermediate 2 * hidden, vocabulary 130) saved as a Hugging Face checkpoint."""
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        vocab_size=130,
        max_position_embeddings=512,
        initializer_range=0.05,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path
