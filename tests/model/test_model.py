"""The model core at one device against transformers (float32), and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from conftest import ARCHITECTURES, build_checkpoint, load_reference, mapped_files

from llama3_dist import (
    ConfigError,
    KVCacheExhaustedError,
    Llama3Config,
    Llama3Model,
    ReturnHiddenStates,
    ReturnLogits,
    TextContext,
)
from llama3_dist.model.checkpoint import CheckpointError

TOL = dict(atol=1e-4, rtol=1e-4)
CONFIGS = Path(__file__).parents[1] / "data" / "configs"


def prompts(vocab: int, lengths=(5, 17, 40)) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_prefill_and_decode_match_transformers(arch, checkpoints, references):
    """Every position of a ragged prefill, then 16 greedy decode steps, equal transformers' logits."""
    ref = references(arch)
    batch = prompts(130)
    with Llama3Model.from_pretrained(
        checkpoints[arch], devices=["cpu"], dtype="float32", return_logits=ReturnLogits.ALL, block_size=8
    ) as model:
        ctxs = [TextContext(tokens=list(p)) for p in batch]
        inputs = model.prepare_initial_token_inputs(ctxs)
        out = model.execute(inputs)
        for b, p in enumerate(batch):
            expected = ref(torch.tensor([p])).logits[0]
            got = out.logits[out.logit_offsets[b] : out.logit_offsets[b + 1]]
            torch.testing.assert_close(got, expected, **TOL)
        steps = []
        for _ in range(16):
            next_tokens = out.next_token_logits.argmax(-1)
            inputs = model.prepare_next_token_inputs(next_tokens, inputs)
            out = model.execute(inputs)
            steps.append(out.next_token_logits)
        # One full-sequence forward scores every decode step at once (causal attention).
        for b, ctx in enumerate(ctxs):
            expected = ref(torch.tensor([ctx.tokens])).logits[0, -16:]
            torch.testing.assert_close(torch.stack([s[b] for s in steps]), expected, **TOL)


def test_linear_rope_scaling_matches_transformers(tmp_path):
    path = build_checkpoint("llama", tmp_path / "linear", rope_scaling={"rope_type": "linear", "factor": 4.0})
    tokens = prompts(130, (70,))[0]
    with Llama3Model.from_pretrained(path, dtype="float32", return_logits=ReturnLogits.ALL) as model:
        assert model.config.rope_scaling_params.rope_type == "linear"
        got = model.execute(model.prepare_initial_token_inputs([TextContext(tokens=tokens)])).logits
    torch.testing.assert_close(got, load_reference(path)(torch.tensor([tokens])).logits[0], **TOL)


def test_ragged_batch_equals_each_sequence_alone(checkpoints):
    lengths = (1, 300, 17, 64, 129)
    batch = prompts(130, lengths)
    with Llama3Model.from_pretrained(
        checkpoints["llama"], dtype="float32", return_logits=ReturnLogits.ALL, block_size=16
    ) as model:
        together = model.execute(model.prepare_initial_token_inputs([TextContext(tokens=p) for p in batch]))
        for b, p in enumerate(batch):
            alone = model.execute(model.prepare_initial_token_inputs([TextContext(tokens=p)]))
            got = together.logits[together.logit_offsets[b] : together.logit_offsets[b + 1]]
            torch.testing.assert_close(got, alone.logits, **TOL)


def test_prefill_and_decode_share_a_batch(checkpoints, references):
    """A decoding sequence and a fresh prompt in one step give the same logits as transformers."""
    ref = references("llama")
    a, b = prompts(130, (12, 9))
    with Llama3Model.from_pretrained(checkpoints["llama"], dtype="float32", block_size=4) as model:
        ctx_a = TextContext(tokens=list(a))
        model.execute(model.prepare_initial_token_inputs([ctx_a]))
        ctx_a.tokens.append(7)
        ctx_b = TextContext(tokens=list(b))
        out = model.execute(model.prepare_initial_token_inputs([ctx_a, ctx_b]))
        torch.testing.assert_close(out.next_token_logits[0], ref(torch.tensor([[*a, 7]])).logits[0, -1], **TOL)
        torch.testing.assert_close(out.next_token_logits[1], ref(torch.tensor([b])).logits[0, -1], **TOL)


def test_both_config_formats_give_identical_logits(checkpoints, tmp_path):
    """transformers-4 style (rope_scaling + rope_theta) and transformers-5 style (rope_parameters)."""
    src = Path(checkpoints["llama"])
    config = json.loads((src / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3"
    v4 = dict(config)
    rope = dict(v4.pop("rope_parameters"))
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = rope
    old = tmp_path / "v4"
    old.mkdir()
    (old / "config.json").write_text(json.dumps(v4))
    shutil.copy(src / "model.safetensors", old / "model.safetensors")
    assert Llama3Config.from_pretrained(old) == Llama3Config.from_pretrained(src)
    # A dict and a transformers PretrainedConfig are read the same way as the file.
    assert Llama3Config.from_pretrained(v4) == Llama3Config.from_pretrained(src)
    assert Llama3Config.from_pretrained(transformers.AutoConfig.from_pretrained(src)) == Llama3Config.from_pretrained(
        src
    )
    tokens = prompts(130, (33,))[0]
    results = []
    for path in (src, old):
        with Llama3Model.from_pretrained(path, dtype="float32", return_logits=ReturnLogits.ALL) as model:
            results.append(model.execute(model.prepare_initial_token_inputs([TextContext(tokens=tokens)])).logits)
    assert torch.equal(results[0], results[1])


def test_sharded_checkpoint_and_bfloat16(tmp_path, checkpoints, references):
    """A checkpoint split over several files loads; bfloat16 stays within bfloat16 error of float32.
    Once loaded, the model maps no file of the checkpoint: a weight read as stored (float32 here)
    is copied out of safetensors' map, which would otherwise keep every page of the file read."""
    path = tmp_path / "sharded"
    load_reference(checkpoints["qwen2"]).save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    tokens = prompts(130, (48,))[0]
    expected = references("qwen2")(torch.tensor([tokens])).logits[0]
    for dtype, tol in (("float32", 1e-4), ("bfloat16", 5e-2)):
        with Llama3Model.from_pretrained(path, dtype=dtype, return_logits=ReturnLogits.ALL) as model:
            assert not mapped_files(path), dtype
            got = model.execute(model.prepare_initial_token_inputs([TextContext(tokens=tokens)])).logits
        assert got.dtype == torch.float32
        err = (got - expected).abs().max().item()
        assert err < tol * expected.abs().max().item() + tol, (dtype, err)


def test_logits_modes_hidden_states_and_log_probabilities(checkpoints, references):
    ref = references("llama")
    batch = prompts(130, (10, 6))
    expected = [ref(torch.tensor([p]), output_hidden_states=True) for p in batch]
    with Llama3Model.from_pretrained(
        checkpoints["llama"],
        dtype="float32",
        return_logits=ReturnLogits.VARIABLE,
        return_hidden_states=ReturnHiddenStates.ALL_NORMALIZED,
    ) as model:
        inputs = model.prepare_initial_token_inputs([TextContext(tokens=p) for p in batch], return_n_logits=3)
        out = model.execute(inputs)
        assert out.logit_offsets.tolist() == [0, 3, 6]
        for b in range(2):
            torch.testing.assert_close(out.logits[3 * b : 3 * b + 3], expected[b].logits[0, -3:], **TOL)
            torch.testing.assert_close(out.next_token_logits[b], expected[b].logits[0, -1], **TOL)
            rows = out.hidden_states[inputs.input_row_offsets[b] : inputs.input_row_offsets[b + 1]]
            torch.testing.assert_close(rows, expected[b].hidden_states[-1][0], **TOL)
        next_tokens = out.next_token_logits.argmax(-1)
        lp = model.compute_log_probabilities(inputs, out, next_tokens, batch_top_n=[5, 0], batch_echo=[True, False])
        assert lp[1] is None
        logp = torch.log_softmax(expected[0].logits[0, -3:], -1)
        targets = [*batch[0][-2:], int(next_tokens[0])]
        torch.testing.assert_close(torch.tensor(lp[0].token_log_probabilities), logp[torch.arange(3), targets], **TOL)
        top = logp[-1].topk(5)
        assert list(lp[0].top_log_probabilities[-1]) == top.indices.tolist()
    with Llama3Model.from_pretrained(
        checkpoints["llama"], dtype="float32", return_hidden_states=ReturnHiddenStates.LAST
    ) as model:
        out = model.execute(model.prepare_initial_token_inputs([TextContext(tokens=p) for p in batch]))
        assert out.logits is None and out.next_token_logits.shape == (2, 130)
        # LAST is the final residual stream before the final norm.
        norm = ref.model.norm
        for b in range(2):
            torch.testing.assert_close(norm(out.hidden_states[b : b + 1]), expected[b].hidden_states[-1][0, -1:], **TOL)


def test_release_frees_pages_and_exhaustion_is_a_clear_error(checkpoints):
    with Llama3Model.from_pretrained(checkpoints["llama"], dtype="float32", block_size=4, num_kv_blocks=6) as model:
        ctx = TextContext(tokens=list(range(1, 20)))  # 5 blocks
        model.execute(model.prepare_initial_token_inputs([ctx]))
        with pytest.raises(KVCacheExhaustedError, match="2 more blocks of 4 tokens needed, 1 of 6 free"):
            model.prepare_initial_token_inputs([TextContext(tokens=list(range(1, 8)))])
        model.release(ctx)
        assert model.pool.num_free_blocks == 6
        model.execute(model.prepare_initial_token_inputs([TextContext(tokens=list(range(1, 8)))]))


def test_every_real_config_loads():
    expected = {
        "meta-llama__Llama-3.1-8B.json": dict(
            head_dim=128, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0, max_seq_len=131072
        ),
        "meta-llama__Llama-3.2-1B.json": dict(head_dim=64, tie_word_embeddings=True, num_hidden_layers=16),
        "Qwen__Qwen2.5-7B-Instruct.json": dict(attention_bias=True, attention_out_bias=False, sliding_window=None),
        "ibm-granite__granite-3.0-8b-instruct.json": dict(
            embedding_multiplier=12.0, attention_multiplier=0.0078125, residual_multiplier=0.22, logits_scaling=16.0
        ),
        "microsoft__Phi-3-mini-4k-instruct.json": dict(stacked_qkv=True, stacked_mlp=True, sliding_window=2047),
        "microsoft__Phi-4-mini-instruct.json": dict(partial_rotary_factor=0.75, head_dim=128, tie_word_embeddings=True),
        "mistralai__Mistral-7B-Instruct-v0.3.json": dict(sliding_window=None, vocab_size=32768, rope_theta=1e6),
    }
    files = sorted(CONFIGS.glob("*.json"))
    assert len(files) == 19
    for file in files:
        config = Llama3Config.from_pretrained(file, devices=["cpu"])
        for field, value in expected.get(file.name, {}).items():
            assert getattr(config, field) == value, (file.name, field)
    c = Llama3Config.from_pretrained(CONFIGS / "meta-llama__Llama-3.1-8B.json", dtype="bfloat16")
    assert c.kv_params.bytes_per_token == 131072
    assert c.rope_scaling_params.factor == 8.0 and c.rope_scaling_params.orig_max_position == 8192
    phi35 = Llama3Config.from_pretrained(CONFIGS / "microsoft__Phi-3.5-mini-instruct.json")
    assert phi35.longrope_scaling_params.original_max_position == 4096
    assert len(phi35.longrope_scaling_params.long_factor) == 48
    assert phi35.longrope_scaling_params.attention_factor == pytest.approx(1.1902380714238083)
    tp8 = Llama3Config.from_pretrained(CONFIGS / "meta-llama__Llama-3.1-70B.json", devices=["cpu"] * 8)
    assert tp8.kv_params.n_kv_heads_per_device == 1 and tp8.kv_params.bytes_per_token_per_device == 2 * 80 * 1 * 128 * 2


def _corrupt(tmp_path, src, name, edit):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_bad_checkpoints_are_clear_errors(tmp_path, checkpoints):
    src = Path(checkpoints["llama"])

    def edit_config(**changes):
        def edit(d):
            c = json.loads((d / "config.json").read_text())
            c.update(changes)
            (d / "config.json").write_text(json.dumps(c))

        return edit

    with pytest.raises(ConfigError, match=r"no config\.json"):
        Llama3Model.from_pretrained(tmp_path / "nowhere")
    bad = _corrupt(tmp_path, src, "arch", edit_config(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ConfigError, match=r"unsupported architecture.*GPT2LMHeadModel.*LlamaForCausalLM"):
        Llama3Model.from_pretrained(bad)
    bad = _corrupt(
        tmp_path, src, "rope", edit_config(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})
    )
    with pytest.raises(ConfigError, match=r"unknown rope type 'yarn'"):
        Llama3Model.from_pretrained(bad)
    bad = _corrupt(tmp_path, src, "shape", edit_config(intermediate_size=100))
    with pytest.raises(
        CheckpointError,
        match=r"gate_proj.weight' in model.safetensors has shape \[96, 64\], "
        r"expected \[100, 64\]",
    ):
        Llama3Model.from_pretrained(bad)
    bad = _corrupt(tmp_path, src, "layers", edit_config(num_hidden_layers=3))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.2\.input_layernorm\.weight' is missing"):
        Llama3Model.from_pretrained(bad)
    bad = _corrupt(tmp_path, src, "extra", edit_config(num_hidden_layers=1))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*model\.layers\.1"):
        Llama3Model.from_pretrained(bad)

    def to_pickle(d):
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"not loaded")

    bad = _corrupt(tmp_path, src, "pickle", to_pickle)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*arbitrary code"):
        Llama3Model.from_pretrained(bad)
    with pytest.raises(ConfigError, match="max_seq_len 1024 exceeds the checkpoint's max_position_embeddings 512"):
        Llama3Model.from_pretrained(src, max_seq_len=1024)


def test_bad_inputs_are_clear_errors(checkpoints):
    with Llama3Model.from_pretrained(checkpoints["llama"], dtype="float32", max_seq_len=64) as model:
        with pytest.raises(ValueError, match="token id 130 is outside the vocabulary \\[0, 130\\)"):
            model.prepare_initial_token_inputs([TextContext(tokens=[1, 130])])
        with pytest.raises(ValueError, match="prompt is empty"):
            model.prepare_initial_token_inputs([TextContext(tokens=[])])
        with pytest.raises(ValueError, match="65 tokens exceed max_seq_len 64"):
            model.prepare_initial_token_inputs([TextContext(tokens=[1] * 65)])
        # A refused batch claims nothing and the model keeps serving.
        assert model.pool.num_free_blocks == model.pool.num_blocks
        out = model.execute(model.prepare_initial_token_inputs([TextContext(tokens=[1, 2])]))
        assert out.next_token_logits.shape == (1, 130)
