"""Weight-only int8 (quantization="int8"): the projections hold int8 values and a scale per output
row; the engine's greedy tokens are those transformers computes with the same int8 weights
dequantized (each token the reference's argmax, ties within float rounding allowed), in float32
and bfloat16 activations; the weights take about half the bytes of bfloat16; a bad value is named."""

from __future__ import annotations

import pytest
import torch
import transformers

from llama3_dist import LLM, ConfigError, SamplingParams
from llama3_dist.kernels.reference import quantize_int8

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def int8_reference(path: str) -> transformers.PreTrainedModel:
    """transformers on the checkpoint with every projection replaced by its dequantized int8 copy."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                quantized, scale = quantize_int8(module.weight)
                module.weight.copy_(quantized.float() * scale[:, None])
    return model.eval()


def generate(path: str, **kwargs) -> list[list[int]]:
    with LLM(path, show_progress=False, kv_cache_bytes=8 << 20, quantization="int8", **kwargs) as llm:
        worker = llm.engine.executor.worker
        layer = worker.model.decoder_layers[0]
        assert layer.self_attn.qkv_proj.weight.dtype == torch.int8 and layer.mlp.down_proj.weight.dtype == torch.int8
        assert worker.model.lm_head.weight.dtype != torch.int8  # the head keeps the model's dtype
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("bfloat16", 0.15)])
def test_int8_greedy_tokens_are_the_dequantized_references_argmax(checkpoints, dtype, tolerance):
    path = checkpoints["llama"]
    reference = int8_reference(path)
    for prompt, tokens in zip(PROMPTS, generate(path, dtype=dtype), strict=True):
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        chosen = logits[torch.arange(len(tokens)), tokens]
        assert (chosen >= logits.max(-1).values - tolerance).all(), (prompt, tokens)


def layer_bytes(llm: LLM) -> int:
    return sum(p.numel() * p.element_size() for p in llm.engine.executor.worker.model.layers.parameters())


def test_int8_halves_the_projection_bytes_and_bad_values_are_named(checkpoints):
    path = checkpoints["llama"]
    with LLM(path, dtype="bfloat16", show_progress=False, kv_cache_bytes=8 << 20) as dense:
        dense_bytes = layer_bytes(dense)
    with LLM(path, dtype="bfloat16", quantization="int8", show_progress=False, kv_cache_bytes=8 << 20) as quant:
        quant_bytes = layer_bytes(quant)
    assert quant_bytes < 0.55 * dense_bytes, (quant_bytes, dense_bytes)
    with pytest.raises(ConfigError, match=r"quantization 'int4' is not supported; use one of \(None, 'int8'\)"):
        LLM(path, quantization="int4", show_progress=False)
