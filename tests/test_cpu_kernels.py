"""The compiled CPU kernels (llama3_dist/kernels/cpu_kernels.cpp) against the torch reference.

They do the reference's arithmetic (float32 math, bfloat16 roundings in the same places), so
outputs must agree to within float32 summation order: almost every element bit for bit, the rest
one bfloat16 step apart. Caches and outputs are poisoned with NaN where nothing may be read or
left unwritten.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import paged_cache
from llama3_dist import kernels
from llama3_dist.kernels import cpu
from llama3_dist.kernels import reference as ref

BF16 = torch.bfloat16

MISSING = cpu.missing_features()
TURNED_OFF = os.environ.get("LLAMA3_DIST_CPU_KERNELS", "1") == "0"
if not (MISSING or TURNED_OFF) and cpu.library() is None:
    raise RuntimeError("this CPU has AVX-512 but the CPU kernels did not build; see the warning above")
built = pytest.mark.skipif(bool(MISSING) or TURNED_OFF,
                           reason=f"the CPU kernels are off or need {', '.join(MISSING)}")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def randn(*shape):
    return torch.randn(*shape).to(BF16)


def assert_matches(got: torch.Tensor, expected: torch.Tensor, exact_fraction: float = 0.99):
    """Within one bfloat16 step everywhere, and bit-identical nearly everywhere."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=2 ** -7, atol=1e-3)
    same = (got == expected).float().mean().item()
    assert same >= exact_fraction, f"only {same:.4f} of the elements are bit-identical"


@built
@pytest.mark.parametrize("D,residual,weight", [(1024, True, True), (80, False, True), (96, True, False)])
@pytest.mark.parametrize("N", [1, 37])
def test_rms_norm(N, D, residual, weight):
    x, r = randn(N, D), (randn(N, D) if residual else None)
    w = (1 + 0.5 * torch.randn(D)).to(BF16) if weight else None
    out, h = cpu.rms_norm(x, w, 1e-5, r)
    ref_out, ref_h = ref.rms_norm(x, w, 1e-5, r)
    assert torch.equal(h, ref_h)
    assert_matches(out, ref_out)


@built
@pytest.mark.parametrize("d,rot,interleaved,hq,hk", [
    (64, 64, False, 4, 4),     # full rotary, Hugging Face layout
    (128, 96, True, 8, 2),     # partial rotary (0.75), GGUF layout
    (96, 48, False, 6, 2),     # partial, rotate-half
])
def test_rotary_embedding(d, rot, interleaved, hq, hk):
    N, max_pos = 9, 64
    qkv = randn(N, (hq + 2 * hk) * d)  # q and k as the model passes them: views into qkv
    expected = qkv.clone()
    inv = 1.0 / (500000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, max_pos, (N,))

    def views(t):
        return t[:, :hq * d].view(N, hq, d), t[:, hq * d:(hq + hk) * d].view(N, hk, d)

    ref.rotary_embedding(positions, *views(expected), cos_sin, interleaved)
    cpu.rotary_embedding(positions, *views(qkv), cos_sin, interleaved)
    # Same roundings in the same order: bit for bit, v and the unrotated features included.
    assert torch.equal(qkv, expected)


@built
@pytest.mark.parametrize("N,inter", [(1, 3584), (5, 1100)])
def test_silu_and_mul(N, inter):
    x = randn(N, 2 * inter) * 4
    assert_matches(cpu.silu_and_mul(x), ref.silu_and_mul(x))


@built
def test_store_kv_cache():
    N, hq, hk, d, num_pages, page_size = 11, 4, 2, 64, 6, 4
    qkv = randn(N, (hq + 2 * hk) * d)
    k, v = qkv[:, hq * d:(hq + hk) * d].view(N, hk, d), qkv[:, (hq + hk) * d:].view(N, hk, d)
    slots = torch.randperm(num_pages * page_size)[:N]
    slots[[2, 7]] = -1
    k_cache = torch.full((num_pages, page_size, hk, d), float("nan"), dtype=BF16)
    v_cache = torch.full_like(k_cache, float("nan"))
    ek, ev = k_cache.clone(), v_cache.clone()
    ref.store_kv_cache(k, v, ek, ev, slots)
    cpu.store_kv_cache(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, ek, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, ev, rtol=0, atol=0, equal_nan=True)


@built
@pytest.mark.parametrize("d,hq,hk,page_size,lens,window", [
    (64, 16, 4, 16, [33], None),               # the benchmark model's heads, batch of one
    (128, 8, 2, 16, [1, 37, 300], None),       # GQA 4, several sequences, one of one token
    (128, 8, 1, 8, [45, 130, 9], 32),          # GQA 8, sliding window
    (96, 6, 6, 16, [50, 21], 20),              # head_dim 96, no grouping, window
])
def test_paged_decode_attention(d, hq, hk, page_size, lens, window):
    k_cache, v_cache, tables, ctx = paged_cache(lens, page_size, hk, d, BF16, "cpu", pad_value=0)
    qkv = randn(len(lens), (hq + 2 * hk) * d)
    q = qkv[:, :hq * d].view(len(lens), hq, d)  # a strided view, as the model passes it
    scale = d ** -0.5
    expected = ref.paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, window)
    got = cpu.paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, window)
    assert not got.isnan().any()
    assert_matches(got, expected, exact_fraction=0.97)


@built
@pytest.mark.parametrize("rows", [1, 5, 13, 40])
def test_linear_rounds_a_float32_product(rows):
    """bfloat16 products (the GEMV for few rows, a widened float32 weight for many) compute what
    a bfloat16 GEMM with float32 accumulation computes."""
    x, w, b = randn(rows, 1000), randn(160, 1000), randn(160)
    expected = (x.float() @ w.float().T + b.float()).to(BF16)
    if rows < cpu.WIDEN_MIN_ROWS:
        assert cpu.gemv(x, w, b) is not None  # the compiled GEMV serves it
    with torch.inference_mode():  # the worker's mode; the scratch buffer then serves both
        got = cpu.linear(x, w, b)
    assert_matches(got, expected, exact_fraction=0.98)
    if cpu.needs_help(x, w):
        assert torch.equal(kernels.linear(x, w, b), got)


@built
def test_dispatch(monkeypatch):
    """bfloat16 CPU tensors take the compiled kernels; float32, or LLAMA3_DIST_KERNELS=torch,
    the reference."""
    x = randn(3, 64)
    monkeypatch.setenv("LLAMA3_DIST_KERNELS", "auto")
    assert kernels._impl(x) is cpu
    assert kernels._impl(x.float()) is ref
    monkeypatch.setenv("LLAMA3_DIST_KERNELS", "torch")
    assert kernels._impl(x) is ref


@built
def test_bfloat16_model_matches_torch_path(tmp_path, monkeypatch):
    """A bfloat16 model through the engine: the compiled kernels give the torch path's logits
    (prefill, then decode steps) to within bfloat16 rounding."""
    transformers = pytest.importorskip("transformers")
    from llama3_dist import Llama3Model, ReturnLogits, TextContext

    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=256, num_hidden_layers=2, vocab_size=256)
    transformers.LlamaForCausalLM(config).to(BF16).eval().save_pretrained(tmp_path)
    prompts = [[3, 17, 99, 5, 64], list(range(40, 60))]

    def run(mode):
        monkeypatch.setenv("LLAMA3_DIST_KERNELS", mode)
        with Llama3Model.from_pretrained(tmp_path, devices=["cpu"], dtype="bfloat16",
                                         return_logits=ReturnLogits.ALL, page_size=8, num_kv_pages=16) as model:
            inputs = model.prepare_initial_token_inputs([TextContext(tokens=list(p)) for p in prompts])
            logits = [model.execute(inputs).logits]
            for step in range(4):
                inputs = model.prepare_next_token_inputs([7 + step, 11 * step], inputs)
                logits.append(model.execute(inputs).logits)
        return logits

    calls = []
    monkeypatch.setattr(cpu, "paged_decode_attention",
                        lambda *a, _f=cpu.paged_decode_attention: calls.append(1) or _f(*a))
    expected = run("torch")
    assert not calls
    got = run("auto")
    assert len(calls) == 4 * config.num_hidden_layers
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0.05, atol=0.05)
        assert (g.argmax(-1) == e.argmax(-1)).float().mean() >= 0.9


def test_torch_fallback_without_the_library():
    """LLAMA3_DIST_CPU_KERNELS=0 (as on a CPU without AVX-512 or a compiler): one warning, then
    the torch reference for every kernel and oneDNN for products, with the same results."""
    code = (
        "import logging, torch\n"
        "from llama3_dist import kernels\n"
        "from llama3_dist.kernels import cpu, reference\n"
        "logging.basicConfig()\n"
        "x = torch.randn(3, 64).to(torch.bfloat16); w = torch.randn(32, 64).to(torch.bfloat16)\n"
        "assert kernels._impl(x) is reference and cpu.library() is None and cpu.gemv(x, w, None) is None\n"
        "expected = (x.float() @ w.float().T).to(torch.bfloat16)\n"
        "torch.testing.assert_close(kernels.linear(x, w), expected, rtol=2 ** -7, atol=1e-3)\n")
    env = {**os.environ, "LLAMA3_DIST_CPU_KERNELS": "0", "LLAMA3_DIST_KERNELS": "auto"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("LLAMA3_DIST_CPU_KERNELS=0") == 1, done.stderr
