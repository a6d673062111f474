"""Weight-only quantization at load: "int8" (an int8 value per weight, a scale per output row) and
"int4" / "int4-g128" (4 bits, a float16 scale and offset per group of 32 / 128 input features).
The engine's greedy tokens are those transformers computes with the same quantized weights
dequantized (each token the reference's argmax, ties within float rounding allowed), in float32
and bfloat16 activations, at one device and (int4) sharded over two; the quantized projections
take about half (int8) or a third (int4) of bfloat16's bytes; a bad value is named."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import build_checkpoint
from quantized_files import PROJECTIONS, compressed_checkpoint, gptq_or_awq_checkpoint

from llama3_dist import LLM, ConfigError, SamplingParams
from llama3_dist.config import GROUP_SIZES
from llama3_dist.kernels import reference
from llama3_dist.model.checkpoint import TORCH_DTYPES

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


ROW_PARALLEL = ("o_proj", "down_proj")  # input features split across ranks


def dequantized(weight: torch.Tensor, quantization: str) -> torch.Tensor:
    """What the engine computes with in place of `weight`."""
    if quantization == "int8":
        values, scale = reference.quantize_int8(weight)
        return values.float() * scale[:, None]
    return reference.dequantize(reference.quantize_int4(weight, GROUP_SIZES[quantization]))


def quantized_reference(
    path: str, quantization: str, ranks: int = 1, dtype: torch.dtype = torch.float32
) -> transformers.PreTrainedModel:
    """transformers on the checkpoint with every projection replaced by its dequantized copy, each
    rank's shard quantized on its own as the engine does (row-parallel ones: column shards), and
    the LM head by its 8-bit copy (int4 modes: 6-bit; groups of 32 along a row: vocabulary shards
    do not change it; a tied head gets a copy of its own, the embedding stays dense). Each weight
    is quantized as the engine holds it in `dtype` (a bfloat16 model quantizes its bfloat16
    weights); the model computes in float32."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, module in model.named_modules():
            part = name.rsplit(".", 1)[-1]
            if part in PROJECTIONS:
                shards = module.weight.chunk(ranks, dim=1 if part in ROW_PARALLEL else 0)
                dim = 1 if part in ROW_PARALLEL else 0
                module.weight.copy_(
                    torch.cat([dequantized(shard.to(dtype).float(), quantization) for shard in shards], dim=dim)
                )
        head = model.get_output_embeddings()
        in_groups = reference.quantize_int8_groups if quantization == "int8" else reference.quantize_int6_groups
        quantized_head = in_groups(head.weight.detach().to(dtype).float())
        head.weight = torch.nn.Parameter(reference.dequantize(quantized_head), requires_grad=False)
    return model.eval()


def generate(path: str, quantization: str, **kwargs) -> list[list[int]]:
    with LLM(path, show_progress=False, kv_cache_bytes=8 << 20, quantization=quantization, **kwargs) as llm:
        if llm.engine.executor.__class__.__name__ == "LocalExecutor":
            model = llm.engine.executor.worker.model
            layer = model.decoder_layers[0]
            for projection in (layer.self_attn.qkv_proj, layer.mlp.down_proj):
                assert projection.quantized
                assert projection.weight.dtype in (torch.int8, torch.int32)  # int8 values or packed int4 words
            assert model.lm_head.quantized  # the head: 8 bits (int4 modes: 6) in groups of 32
            assert model.embed_tokens.weight.dtype.is_floating_point  # the lookups keep dense rows
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def assert_reference_argmax(reference_model, generated: list[list[int]], tolerance: float) -> None:
    for prompt, tokens in zip(PROMPTS, generated, strict=True):
        with torch.no_grad():
            logits = reference_model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        chosen = logits[torch.arange(len(tokens)), tokens]
        assert (chosen >= logits.max(-1).values - tolerance).all(), (prompt, tokens)


@pytest.mark.parametrize("quantization", ["int8", "int4", "int4-g128"])
@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("bfloat16", 0.15)])
def test_greedy_tokens_are_the_dequantized_references_argmax(checkpoints, quantization, dtype, tolerance):
    path = checkpoints["llama"]
    assert_reference_argmax(
        quantized_reference(path, quantization, dtype=getattr(torch, dtype)),
        generate(path, quantization, dtype=dtype),
        tolerance,
    )


def test_prompt_rows_and_first_positions_are_never_rounded_to_int8(checkpoints, monkeypatch):
    """bfloat16 int4 on the CPU: the integer GEMV rounds x to int8 blocks in decode steps only.
    A prompt's rows, and a decode-shaped step whose row is a sequence's first position (a 1-token
    prompt), run exact: in the fused stack's prompt mode (its weights all in panels) up to where
    the per-kernel path would dequantize for a GEMM, past that on the per-kernel path
    (cpu.decode_rows off); later steps may round."""
    from llama3_dist.kernels import cpu

    if cpu.library() is None or not cpu.library().integer_dot:
        pytest.skip("no compiled CPU library with byte dot products here")
    seen: list[bool] = []
    fused_calls: list[tuple[int, bool]] = []
    real_decode_rows, real_stack = cpu.decode_rows, cpu.FusedDecodeStack.__call__

    def spy_decode_rows(is_decode):
        seen.append(is_decode)
        return real_decode_rows(is_decode)

    def spy_stack(self, x, step, kv_caches, tokens=None, prompt=False):
        fused_calls.append(((x if x is not None else tokens).shape[0], prompt))
        return real_stack(self, x, step, kv_caches, tokens, prompt)

    monkeypatch.setattr(cpu, "decode_rows", spy_decode_rows)
    monkeypatch.setattr(cpu.FusedDecodeStack, "__call__", spy_stack)
    with LLM(checkpoints["llama"], dtype="bfloat16", quantization="int4", show_progress=False) as llm:
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        decoded = [(1, False), (1, False)]  # the 2 decode steps, fused and rounding
        llm.generate(prompt_token_ids=[[5]], sampling_params=params, use_tqdm=False)  # 1-token prompt
        assert seen == [] and fused_calls == [(1, True), *decoded]  # position 0 in the prompt mode
        fused_calls.clear()
        llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=params, use_tqdm=False)
        assert seen == [] and fused_calls == [(3, True), *decoded]
        fused_calls.clear()
        llm.generate(prompt_token_ids=[list(range(5, 17))], sampling_params=params, use_tqdm=False)
        assert seen == [] and fused_calls == [(12, True), *decoded]  # 12 rows: still the prompt mode
        fused_calls.clear()
        rows = cpu.prompt_panel_widen_rows(torch.bfloat16, 4, cpu.library())
        prompt = [5 + i % 100 for i in range(rows)]  # the tiny vocabulary's ids
        llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)
        assert seen == [False] and fused_calls == decoded  # the per-kernel path, exact


@pytest.mark.slow
def test_int4_sharded_over_two_ranks(checkpoints, ray_local):
    """Each rank quantizes its own shard (the tiny model's down_proj has 96 input features, 48 a
    rank: its groups of 32 start anew on each rank), and the sharded products sum to the
    reference's."""
    path = checkpoints["llama"]
    assert_reference_argmax(
        quantized_reference(path, "int4", ranks=2),
        generate(path, "int4", devices=["cpu", "cpu"], dtype="float32"),
        1e-4,
    )


def layer_bytes(llm: LLM) -> int:
    model = llm.engine.executor.worker.model
    return sum(
        sum(t.numel() * t.element_size() for t in (p.weight, getattr(p, "weight_scale", None)) if t is not None)
        + sum(
            t.numel() * t.element_size()
            for t in (getattr(p.grouped, "scales", None), getattr(p.grouped, "offsets", None))
            if t is not None
        )
        for p in model.modules()
        if hasattr(p, "quantized")
    )


def test_quantized_projection_bytes_and_bad_values_are_named(tmp_path):
    # Widths of whole 4-bit blocks (128 weights on AVX-512): narrower rows are padded to one.
    path = build_checkpoint("llama", tmp_path, hidden_size=128, intermediate_size=256)
    sizes = {}
    for quantization in (None, "int8", "int4"):
        with LLM(path, dtype="bfloat16", quantization=quantization, show_progress=False, kv_cache_bytes=8 << 20) as llm:
            sizes[quantization] = layer_bytes(llm)
    assert sizes["int8"] < 0.55 * sizes[None], sizes
    # 4 bits and 4 bytes of scale and offset per 32 weights: 5/16 of bfloat16, plus block padding
    assert sizes["int4"] < 0.40 * sizes[None], sizes
    with pytest.raises(ConfigError, match=r"quantization 'int3' is not supported; use one of \(None, 'int8', 'int4'"):
        LLM(path, quantization="int3", show_progress=False)


def fp8_checkpoint(source: str, path, strategy: str) -> dict[str, torch.Tensor]:
    """The float32 checkpoint at `source` re-saved as compressed-tensors FP8 (vLLM's
    float-quantized format: float8_e4m3fn projections, a weight_scale per output row or per
    tensor, a static input_scale); returns what each projection's weight dequantizes to."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, path)
    tensors = load_file(f"{path}/model.safetensors")
    dequantized_weights = {}
    for name in [n for n in tensors if n.rsplit(".", 2)[-2] in PROJECTIONS]:
        weight = tensors.pop(name)
        amax = weight.abs().amax(dim=1, keepdim=True) if strategy == "channel" else weight.abs().amax()
        scale = (amax / torch.finfo(torch.float8_e4m3fn).max).float()
        values = (weight / scale).to(torch.float8_e4m3fn)
        base = name.removesuffix(".weight")
        tensors[name], tensors[f"{base}.weight_scale"] = values, scale
        tensors[f"{base}.input_scale"] = torch.tensor(1.0)
        dequantized_weights[name] = values.float() * scale
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head"],
    }
    (path / "config.json").write_text(json.dumps(config))
    return dequantized_weights


@pytest.mark.parametrize(
    "strategy,devices",
    [("channel", ["cpu"]), ("tensor", ["cpu"]), pytest.param("channel", ["cpu", "cpu"], marks=pytest.mark.ray)],
)
def test_fp8_checkpoints_load_dequantized(checkpoints, tmp_path, request, strategy, devices):
    """An FP8 checkpoint (compressed-tensors, channel or tensor scales) gives transformers'
    greedy tokens on its dequantized weights, on one rank and sharded over two (each rank's rows
    and columns of the FP8 values with their scales)."""
    if len(devices) > 1:
        request.getfixturevalue("ray_local")
    path = tmp_path / "fp8"
    weights = fp8_checkpoint(checkpoints["llama"], path, strategy)
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoints["llama"], dtype=torch.float32, attn_implementation="eager"
    ).eval()
    state = reference_model.state_dict()
    with torch.no_grad():
        for name, weight in weights.items():
            state[name].copy_(weight)
    with LLM(str(path), dtype="float32", devices=devices, show_progress=False, kv_cache_bytes=8 << 20) as llm:
        assert llm.engine.config.checkpoint_quantization == "fp8"
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
    assert_reference_argmax(reference_model, [list(o.outputs[0].token_ids) for o in outs], 1e-4)


def test_unsupported_checkpoint_quantizations_are_named(checkpoints, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    path = tmp_path / "fp8"
    fp8_checkpoint(checkpoints["llama"], path, "channel")
    config = json.loads((path / "config.json").read_text())
    for qc, named in (
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes' is not supported"),
        ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4}}}},
         "type 'int', 4 bits"),
    ):  # fmt: skip
        (path / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
        with pytest.raises(ConfigError, match=named):
            LLM(str(path), show_progress=False)
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(f"{path}/model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight_scale"
    tensors[name] = torch.ones(tensors[name].shape[0] // 2, 2)  # block-wise scales
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"up_proj.weight_scale' has shape \[\d+, 2\].*block-wise"):
        LLM(str(path), show_progress=False)


@pytest.mark.parametrize(
    "layout,bits,symmetric,group_size,dtype,devices",
    [
        ("compressed-tensors", 4, True, 32, "float32", ["cpu"]),
        ("compressed-tensors", 4, True, 32, "bfloat16", ["cpu"]),
        ("compressed-tensors", 4, False, 128, "float32", ["cpu"]),
        ("compressed-tensors", 8, True, 32, "float32", ["cpu"]),
        pytest.param("compressed-tensors", 4, False, 32, "float32", ["cpu", "cpu"], marks=pytest.mark.ray),
        ("int-quantized", 8, True, None, "float32", ["cpu"]),
        ("int-quantized", 8, True, None, "bfloat16", ["cpu"]),
        pytest.param("int-quantized", 8, True, None, "float32", ["cpu", "cpu"], marks=pytest.mark.ray),
        ("int-quantized", 8, True, 32, "bfloat16", ["cpu"]),
        ("gptq", 4, True, 32, "float32", ["cpu"]),
        ("gptq_v2", 4, False, 128, "bfloat16", ["cpu"]),
        ("gptq-desc-act", 4, True, 32, "float32", ["cpu"]),
        pytest.param("gptq", 8, True, 32, "float32", ["cpu", "cpu"], marks=pytest.mark.ray),
        ("awq", 4, False, 32, "float32", ["cpu"]),
        pytest.param("awq", 4, False, 128, "bfloat16", ["cpu", "cpu"], marks=pytest.mark.ray),
    ],
)
def test_packed_integer_checkpoints(tmp_path, request, layout, bits, symmetric, group_size, dtype, devices):
    """A 4- or 8-bit checkpoint in each layout people serve (compressed-tensors' pack-quantized and
    int-quantized, written by compressed-tensors itself; AutoGPTQ's gptq and gptq_v2; AutoAWQ's
    GEMM) gives the greedy tokens of transformers on the weights the checkpoint's integers and
    scales define, with its projections kept packed (4 or 8 bits a weight; int8 with a scale per
    row in quantization="int8"'s form) wherever their groups are consecutive columns: symmetric
    and with zero points, groups of 32 and 128 or a scale per row, float32 and bfloat16, on one
    rank and sharded over two (each rank reads its rows, or for o/down its whole groups of
    columns, and their scales and zero points). GPTQ's activation order (desc_act: a column's
    group from g_idx) loads dequantized, exactly."""
    if len(devices) > 1:
        request.getfixturevalue("ray_local")
    source = build_checkpoint("llama", tmp_path / "source", hidden_size=128, intermediate_size=256)
    path = tmp_path / "packed"
    if layout == "compressed-tensors":
        weights = compressed_checkpoint(source, path, bits, symmetric, group_size)
    elif layout == "int-quantized":  # W8A8: run weight-only
        weights = compressed_checkpoint(
            source, path, bits, symmetric, group_size, packing="int-quantized", int8_activations=True
        )
    else:
        method = "awq" if layout == "awq" else "gptq"
        weights = gptq_or_awq_checkpoint(
            source, path, method, bits, symmetric, group_size, desc_act=layout == "gptq-desc-act",
            checkpoint_format="gptq_v2" if layout == "gptq_v2" else "gptq",
        )  # fmt: skip
    reference_model = transformers.AutoModelForCausalLM.from_pretrained(
        source, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, tensor in reference_model.state_dict().items():
            tensor.copy_(weights[name])
    with LLM(str(path), dtype=dtype, devices=devices, show_progress=False, kv_cache_bytes=8 << 20) as llm:
        assert llm.engine.config.checkpoint_quantization == f"int{bits}"
        if len(devices) == 1:
            layer = llm.engine.executor.worker.model.decoder_layers[0]
            if layout == "gptq-desc-act":  # dequantized at load
                assert layer.mlp.down_proj.grouped is None
                assert layer.mlp.down_proj.weight.dtype == TORCH_DTYPES[dtype]
            elif group_size is None:  # int8 with a scale per row: quantization="int8"'s form
                for projection in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
                    assert projection.quantized and projection.weight.dtype in (torch.int8, torch.int32)
            else:
                for projection in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
                    assert projection.grouped is not None and projection.grouped.bits == bits
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
    tolerance = 1e-4 if dtype == "float32" else 0.15
    generated = [list(o.outputs[0].token_ids) for o in outs]
    assert_reference_argmax(reference_model, generated, tolerance)
    if layout == "compressed-tensors" and symmetric:  # transformers reads these itself, through compressed-tensors
        own_reading = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        assert_reference_argmax(own_reading, generated, tolerance)


def test_pack_quantized_forms_the_kernels_do_not_run_load_dequantized(tmp_path):
    """Scales float16 cannot hold (here float32) and a column slice that cuts a group read as
    the exact dense weight instead of the grouped form; unpacked int8 zero points (older
    compressed-tensors) read as packed ones; packed shapes that disagree with weight_shape, and
    GPTQ / AWQ configurations not read here, are refused by name."""
    import json

    from safetensors.torch import load_file, save_file

    from llama3_dist.model.checkpoint import Checkpoint

    source = build_checkpoint("llama", tmp_path / "source", hidden_size=128, intermediate_size=256)
    path = tmp_path / "packed"
    weights = compressed_checkpoint(source, path, 4, True, 128, scale_dtype=torch.float32)
    checkpoint = Checkpoint(path)
    name = "model.layers.0.mlp.down_proj.weight"
    assert checkpoint.read_grouped(name) is None  # float32 scales
    torch.testing.assert_close(checkpoint.read(name), weights[name], rtol=0, atol=0)
    weights = compressed_checkpoint(source, tmp_path / "bf16", 4, True, 128)
    checkpoint = Checkpoint(tmp_path / "bf16")
    assert checkpoint.read_grouped(name, 8, 16, cols=(0, 128)) is not None
    assert checkpoint.read_grouped(name, 8, 16, cols=(64, 192)) is None  # cuts groups of 128
    torch.testing.assert_close(checkpoint.read(name, 8, 16, (64, 192)), weights[name][8:24, 64:192], rtol=0, atol=0)
    grouped = checkpoint.read_grouped(name)
    # Zero points as older compressed-tensors wrote them for symmetric weights: int8 zeros, unpacked.
    tensors = load_file(f"{tmp_path}/bf16/model.safetensors")
    tensors[f"{name}_zero_point"] = torch.zeros(tensors[f"{name}_scale"].shape, dtype=torch.int8)
    save_file(tensors, f"{tmp_path}/bf16/model.safetensors", metadata={"format": "pt"})
    with_zeros = Checkpoint(tmp_path / "bf16").read_grouped(name)
    assert with_zeros is not None and grouped is not None and torch.equal(with_zeros.offsets, grouped.offsets)

    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    for qc, named in (
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, r"gptq quantization_config \(bits 3, format ''\)"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, r"awq quantization_config \(bits 4, format 'gemv'\)"),
    ):
        (tmp_path / "bf16" / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
        with pytest.raises(ConfigError, match=named):
            LLM(str(tmp_path / "bf16"), show_progress=False)
    tensors = load_file(f"{path}/model.safetensors")
    tensors[f"{name}_shape"] = torch.tensor([128, 200])
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"down_proj.weight_packed' has shape \[128, 32\]; a 128 x 200 weight"):
        LLM(str(path), show_progress=False)


def fp8_reference(path: str) -> transformers.PreTrainedModel:
    """transformers with every projection computing FP8 W8A8 as the engine's "fp8" defines it,
    written out here: the weight in float8 with a scale per row, x rounded to float8 with a
    scale per token, the product in float32 then both scales; the LM head in 8-bit groups."""
    model = quantized_reference(path, "int8")  # for its 8-bit head; the projections are replaced
    dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    fp8_max = torch.finfo(torch.float8_e4m3fn).max

    def forward(module, x):
        x_scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / fp8_max
        x8 = (x / x_scale).to(torch.float8_e4m3fn).float()
        return (x8 @ module.fp8_values.T) * x_scale * module.fp8_scale

    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in PROJECTIONS:
                weight = dense[f"{name}.weight"]
                scale = weight.abs().amax(dim=1).clamp(min=1e-12) / fp8_max
                module.fp8_values = (weight / scale[:, None]).to(torch.float8_e4m3fn).float()
                module.fp8_scale = scale
                module.forward = forward.__get__(module)
    return model


def test_fp8_weights_and_activations(checkpoints):
    """quantization="fp8": float8 weights (a scale per output channel) and float8 activations (a
    scale per token), multiplied by torch._scaled_mm: the greedy tokens are the argmax of that
    computation written out in transformers, the projections hold float8 (a byte a weight), and a
    row's result does not depend on the rest of the batch."""
    path = checkpoints["llama"]
    with LLM(path, dtype="float32", quantization="fp8", show_progress=False, kv_cache_bytes=8 << 20) as llm:
        layer = llm.engine.executor.worker.model.decoder_layers[0]
        assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
        outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
        alone = llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=GREEDY, use_tqdm=False)
    generated = [list(o.outputs[0].token_ids) for o in outs]
    assert generated[0] == list(alone[0].outputs[0].token_ids)
    assert_reference_argmax(fp8_reference(path), generated, 1e-4)


def test_fp8_refused_on_gpus_without_fp8(monkeypatch):
    from llama3_dist.model import transformer

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"compute capability 8.9 or newer.*A100-SXM4-80GB \(8.0\)"):
        transformer._check_fp8_device(torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    transformer._check_fp8_device(torch.device("cuda:0"))  # Hopper: accepted


def _cpu_scaled_mm() -> bool:
    """Whether torch._scaled_mm has a CPU kernel here: oneDNN's float8 matmul needs AVX-512 (held
    to AVX2 it cannot create the primitive; that is why the engine upcasts on CPUs)."""
    tiny = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    one = torch.ones(())
    try:
        torch._scaled_mm(tiny, tiny.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("m", [1, 16, 21])
def test_fp8_product_on_fp8_tensor_cores_equals_the_upcast_one(m):
    """The GPUs' float8 product (torch._scaled_mm, rows padded to 16) is the CPUs' (both operands
    upcast, a float32 matmul): checked here on the CPU, where both run on AVX-512 hosts."""
    if not _cpu_scaled_mm():
        pytest.skip("torch._scaled_mm has no CPU kernel without AVX-512 (the AVX2 lane); the main lane runs this")
    x8 = (torch.randn(m, 96) * 20).to(torch.float8_e4m3fn)
    weight = (torch.randn(48, 96) * 20).to(torch.float8_e4m3fn)
    scaled = reference.fp8_product(x8, weight, scaled_mm=True)
    torch.testing.assert_close(scaled, reference.fp8_product(x8, weight, scaled_mm=False), rtol=1e-6, atol=1e-3)
