"""Triton kernels against their torch references (llama3_dist/kernels/reference.py).

Without a GPU the kernels run in triton's interpreter. Triton 3.9 picks the interpreter when
@triton.jit decorates a kernel, i.e. when llama3_dist.kernels.triton_kernels is first imported,
so TRITON_INTERPRET=1 is set here, before that import. Sizes are kept small: the interpreter is
slow. Every buffer a kernel allocates is poisoned with NaN and every cache slot no sequence
owns holds NaN, so an unwritten output or a read of a padding block fails the comparison.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from conftest import paged_cache  # noqa: E402

from llama3_dist import kernels  # noqa: E402
from llama3_dist.kernels import reference as ref  # noqa: E402

tk = importlib.import_module("llama3_dist.kernels.triton_kernels")
if DEVICE == "cpu" and not tk.INTERPRET:
    pytest.skip(
        "llama3_dist.kernels.triton_kernels was imported before TRITON_INTERPRET=1 was "
        "set; run this module in its own process",
        allow_module_level=True,
    )

F32, BF16 = torch.float32, torch.bfloat16
TOL = {F32: dict(rtol=1e-5, atol=1e-5), BF16: dict(rtol=1e-2, atol=1e-2)}
NAN = float("nan")


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    """Forces the Triton path through the dispatchers and poisons every buffer it allocates."""
    monkeypatch.setenv("LLAMA3_DIST_KERNELS", "triton")
    monkeypatch.setattr(tk, "_empty", lambda shape, dtype, device: torch.full(shape, NAN, dtype=dtype, device=device))
    torch.manual_seed(0)


def randn(*shape, dtype=F32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


# ------------------------------------------------------------------------------- elementwise


@pytest.mark.parametrize(
    "dtype,D,residual,weight",
    [
        (F32, 96, True, True),
        (F32, 64, False, False),
        (BF16, 128, True, True),
        (BF16, 80, False, True),
    ],
)
def test_rms_norm(dtype, D, residual, weight):
    N = 7
    x = randn(N, D, dtype=dtype)
    r = randn(N, D, dtype=dtype) if residual else None
    w = (1 + 0.5 * randn(D)).to(dtype) if weight else None
    out, h = kernels.rms_norm(x, w, 1e-6, r)
    ref_out, ref_h = ref.rms_norm(x, w, 1e-6, r)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(h, ref_h, rtol=0, atol=0)


@pytest.mark.parametrize(
    "dtype,d,rot,interleaved,hq,hk",
    [
        (F32, 64, 64, False, 4, 4),  # full rotary, Hugging Face layout
        (BF16, 128, 96, True, 8, 2),  # partial rotary (0.75), GGUF layout
        (F32, 128, 48, False, 20, 4),  # rotary_dim/2 = 24 (padded), 20 heads (two head blocks)
        (BF16, 64, 64, True, 2, 1),
    ],
)
def test_rotary_embedding(dtype, d, rot, interleaved, hq, hk):
    N, max_pos = 9, 64
    # q and k are non-contiguous views into a fused qkv projection output.
    qkv = randn(N, (hq + 2 * hk) * d, dtype=dtype)
    expected = qkv.clone()
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=DEVICE, dtype=F32) / rot))
    freqs = torch.arange(max_pos, device=DEVICE, dtype=F32)[:, None] * inv[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, max_pos, (N,), device=DEVICE)

    def views(t):
        q = t[:, : hq * d].view(N, hq, d)
        k = t[:, hq * d : (hq + hk) * d].view(N, hk, d)
        return q, k

    ref.rotary_embedding(positions, *views(expected), cos_sin, interleaved)
    kernels.rotary_embedding(positions, *views(qkv), cos_sin, interleaved)
    torch.testing.assert_close(qkv, expected, **TOL[dtype])
    # Features past rotary_dim and the v part are untouched, bit for bit.
    q, k = views(qkv)
    q0, k0 = views(expected)
    assert torch.equal(q[..., rot:], q0[..., rot:]) and torch.equal(k[..., rot:], k0[..., rot:])
    assert torch.equal(qkv[:, (hq + hk) * d :], expected[:, (hq + hk) * d :])


@pytest.mark.parametrize("dtype,inter", [(F32, 96), (BF16, 1100)])
def test_silu_and_mul(dtype, inter):
    x = randn(5, 2 * inter, dtype=dtype)
    out = kernels.silu_and_mul(x)
    torch.testing.assert_close(out, ref.silu_and_mul(x), **TOL[dtype])


@pytest.mark.parametrize("dtype,d", [(F32, 64), (BF16, 128)])
def test_store_kv_cache(dtype, d):
    N, hq, hk, num_blocks, block_size = 11, 4, 2, 6, 4
    qkv = randn(N, (hq + 2 * hk) * d, dtype=dtype)
    k = qkv[:, hq * d : (hq + hk) * d].view(N, hk, d)
    v = qkv[:, (hq + hk) * d :].view(N, hk, d)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:N]
    slots[[2, 7]] = -1
    k_cache = torch.full((num_blocks, block_size, hk, d), NAN, dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, NAN)
    ek, ev = k_cache.clone(), v_cache.clone()
    ref.store_kv_cache(k, v, ek, ev, slots)
    kernels.store_kv_cache(k, v, k_cache, v_cache, slots)
    # Exact, and the slots nobody wrote still hold NaN.
    torch.testing.assert_close(k_cache, ek, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, ev, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------- attention


@pytest.mark.parametrize(
    "dtype,d,hq,hk,block_size,lens,window,splits",
    [
        (F32, 64, 2, 2, 16, [1, 37, 70], None, None),  # GQA 1, heuristic (no split)
        (BF16, 128, 8, 2, 16, [300], None, 3),  # GQA 4, batch of one, flash-decoding
        (F32, 128, 8, 1, 8, [45, 130, 9], 32, 4),  # GQA 8, window, splits outside the window
        (BF16, 96, 8, 2, 16, [50, 21], 20, 1),  # head_dim 96 (padded), window
    ],
)
def test_paged_decode_attention(dtype, d, hq, hk, block_size, lens, window, splits):
    k_cache, v_cache, tables, ctx = paged_cache(lens, block_size, hk, d, dtype, DEVICE, pad_value=-1 if splits else 0)
    q = randn(len(lens), hq, d, dtype=dtype)
    scale = d**-0.5
    expected = ref.paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, window)
    if splits is None:
        out = kernels.paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, window)
    else:
        out = tk.paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, window, num_splits=splits)
    torch.testing.assert_close(out, expected, **TOL[dtype])


def test_decode_split_heuristic_follows_the_minimum_partition(monkeypatch):
    """Flash-decoding splits a context capacity into partitions of at least DECODE_MIN_PARTITION
    keys (LLAMA3_DIST_DECODE_MIN_PARTITION), only past 4 of them, and the heuristic's split
    still gives the reference's attention."""
    cpu = torch.device("cpu")  # 16 multiprocessors assumed: 8 * 16 programs wanted
    assert [tk._num_decode_splits(1, 8, cap, cpu) for cap in (1024, 2048, 65536)] == [1, 8, 16]
    monkeypatch.setattr(tk, "DECODE_MIN_PARTITION", 64)
    assert [tk._num_decode_splits(1, 8, cap, cpu) for cap in (256, 512, 2048)] == [1, 8, 16]
    k_cache, v_cache, tables, ctx = paged_cache([300], 16, 2, 64, F32, DEVICE, pad_value=-1)
    q = randn(1, 8, 64)
    expected = ref.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.125)
    torch.testing.assert_close(tk.paged_decode_attention(q, k_cache, v_cache, tables, ctx, 0.125), expected, **TOL[F32])


@pytest.mark.parametrize(
    "dtype,d,hq,hk,block_size,seqs,window",
    [
        # seqs: (context length, query tokens); fewer queries than context = prefix-cached start.
        (F32, 64, 2, 2, 16, [(37, 37), (20, 5), (1, 1)], None),  # GQA 1, many sequences
        (BF16, 128, 8, 2, 16, [(70, 70)], None),  # GQA 4, batch of one
        (F32, 128, 8, 1, 8, [(50, 50), (33, 10)], 16),  # GQA 8, sliding window
        (BF16, 64, 4, 1, 16, [(45, 45), (19, 3)], 7),  # GQA 4, window, tiny chunk
    ],
)
def test_prefill_attention(dtype, d, hq, hk, block_size, seqs, window):
    lens = [c for c, _ in seqs]
    k_cache, v_cache, tables, ctx = paged_cache(lens, block_size, hk, d, dtype, DEVICE, pad_value=0)
    q_lens = torch.tensor([0] + [n for _, n in seqs])
    qsl = q_lens.cumsum(0).to(torch.int32).to(DEVICE)
    q = randn(int(q_lens.sum()), hq, d, dtype=dtype)
    scale = d**-0.5
    expected = ref.prefill_attention(q, k_cache, v_cache, tables, qsl, ctx, scale, window)
    out = kernels.prefill_attention(q, k_cache, v_cache, tables, qsl, ctx, scale, window)
    torch.testing.assert_close(out, expected, **TOL[dtype])


def test_prefill_attention_noncontiguous_q():
    """q as a slice of a fused qkv output, as the model passes it."""
    hq, hk, d, n = 4, 2, 64, 19
    k_cache, v_cache, tables, ctx = paged_cache([n], 16, hk, d, F32, DEVICE, pad_value=0)
    qkv = randn(n, (hq + 2 * hk) * d)
    q = qkv[:, : hq * d].view(n, hq, d)
    qsl = torch.tensor([0, n], dtype=torch.int32, device=DEVICE)
    expected = ref.prefill_attention(q, k_cache, v_cache, tables, qsl, ctx, 0.125)
    out = kernels.prefill_attention(q, k_cache, v_cache, tables, qsl, ctx, 0.125)
    torch.testing.assert_close(out, expected, **TOL[F32])


# ------------------------------------------------------------------------------- dispatch


def test_dispatch_modes(monkeypatch):
    x = randn(3, 16)

    def boom(*args, **kwargs):
        raise AssertionError("Triton path taken")

    monkeypatch.setattr(tk, "silu_and_mul", boom)
    monkeypatch.setenv("LLAMA3_DIST_KERNELS", "torch")
    kernels.silu_and_mul(x)
    if DEVICE == "cpu":
        monkeypatch.setenv("LLAMA3_DIST_KERNELS", "auto")
        kernels.silu_and_mul(x)
    monkeypatch.setenv("LLAMA3_DIST_KERNELS", "triton")
    with pytest.raises(AssertionError, match="Triton path taken"):
        kernels.silu_and_mul(x)
    monkeypatch.setenv("LLAMA3_DIST_KERNELS", "cuda")
    with pytest.raises(ValueError, match="LLAMA3_DIST_KERNELS"):
        kernels.silu_and_mul(x)


@pytest.mark.subprocess
def test_imports_without_triton():
    """The package (and the torch path) work where triton is not installed, e.g. macOS."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from llama3_dist import kernels\n"
        "out, h = kernels.rms_norm(torch.randn(2, 8), None, 1e-6)\n"
        "assert 'triton' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "import os; os.environ['LLAMA3_DIST_KERNELS'] = 'triton'\n"
        "try:\n"
        "    kernels.rms_norm(torch.randn(2, 8), None, 1e-6)\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LLAMA3_DIST_KERNELS"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ------------------------------------------------------------------------ quantized weights

# Sums of a few hundred products: float32 summation order shows at ~1e-5 of their size.
GEMM_TOL = {F32: dict(rtol=1e-5, atol=1e-4), BF16: dict(rtol=1e-2, atol=1e-2)}


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize(
    "bits,group_size,m,n,k",
    [
        pytest.param(4, 32, 1, 96, 200, marks=pytest.mark.slow),  # ~1.4 s a dtype under the interpreter
        (4, 128, 37, 70, 256),
        (4, 32, 5, 33, 67),
        (8, 32, 1, 96, 200),
        (8, 32, 20, 17, 96),
    ],
)
def test_grouped_linear_is_the_dequantized_product(dtype, bits, group_size, m, n, k):
    """w4a16 / w8a16 (int4 groups, GGUF Q8_0/Q4_0/Q4_1): the weights dequantized tile by tile in
    registers give reference.grouped_linear's product (odd widths, partial groups, decode's one
    row and prefill's many, with and without a bias)."""
    weight = randn(n, k)
    if bits == 4:
        grouped = ref.quantize_int4(weight, group_size)
    else:
        values, scale = ref.quantize_int8(weight)
        scales = scale.to(torch.float16)[:, None].repeat(1, -(-k // group_size))
        grouped = ref.GroupQuantized(values, scales, None, 8, group_size)
    grouped = grouped.to(DEVICE)
    x = randn(m, k, dtype=dtype)
    packed = kernels.select(DEVICE, dtype).pack_grouped(grouped)
    assert packed.words.numel() * packed.words.element_size() == n * -(-k * bits // 8)  # the integers, packed
    for bias in (None, randn(n, dtype=dtype)):
        got = tk.grouped_linear(x, packed, bias)
        if dtype == F32:
            torch.testing.assert_close(got, ref.grouped_linear(x, grouped, bias), **GEMM_TOL[dtype])
        else:  # the GEMV (m <= 4) keeps each dequantized weight in float32 where the reference rounds it
            exact = x.float() @ ref.dequantize(grouped, F32).T + (0 if bias is None else bias.float())
            torch.testing.assert_close(got.float(), exact, rtol=2e-2, atol=0.15)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("m,n,k", [(1, 64, 200), (19, 33, 70)])
def test_int8_linear_is_the_scaled_product(dtype, m, n, k):
    """Against the exact product: in bfloat16 the reference itself rounds the unscaled sums
    (hundreds of units) before scaling, so it is the less accurate of the two there."""
    values, scale = ref.quantize_int8(randn(n, k))
    x = randn(m, k, dtype=dtype)
    got = kernels.select(DEVICE, dtype).int8_linear(x, values.to(DEVICE), scale.to(DEVICE))
    exact = x.float() @ (values.float() * scale[:, None]).to(DEVICE).T
    # bfloat16: each dequantized weight rounds by up to 2**-9 of itself: ~0.03 over 200 unit products
    tolerance = GEMM_TOL[dtype] if dtype == F32 else dict(rtol=1e-2, atol=0.15)
    torch.testing.assert_close(got.float(), exact, **tolerance)


@pytest.mark.slow
def test_q4_k_m_gguf_runs_in_the_triton_kernels(tmp_path, monkeypatch):
    """A Q4_K_M-shaped GGUF (Q4_K, with Q6_K v, down and LM head) through the GPU's kernels (here
    under Triton's interpreter): every projection stays in its grouped form (TritonGroupWeights)
    and the greedy tokens are those of the CPU kernels on the same forms (whose tokens are
    transformers' in tests/model/test_gguf.py; against transformers itself this one-layer model
    has a near-tie that the forms' rounding flips)."""
    pytest.importorskip("gguf")
    from gguf_files import PROMPT, Q4_K_M_TYPES, Q, save_small_llama, write_gguf

    from llama3_dist import LLM, SamplingParams

    save_small_llama(tmp_path, 256, 4, 2, layers=1, seed=6)
    file = write_gguf(tmp_path, tmp_path / "q4_k_m.gguf", Q.Q4_K, types=Q4_K_M_TYPES)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    tokens = {}
    for path in ("auto", "triton"):
        monkeypatch.setenv("LLAMA3_DIST_KERNELS", path)
        with LLM(file, devices=[DEVICE], show_progress=False, kv_cache_bytes=4 << 20) as llm:
            layer = llm.engine.executor.worker.model.decoder_layers[0]
            if path == "triton":
                attention, mlp = layer.self_attn, layer.mlp
                for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj):
                    assert isinstance(linear.grouped, tk.TritonGroupWeights)
            outputs = llm.generate(prompt_token_ids=[PROMPT], sampling_params=greedy, use_tqdm=False)
            tokens[path] = list(outputs[0].outputs[0].token_ids)
    assert tokens["triton"] == tokens["auto"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout,bits,symmetric,group_size",
    [
        ("compressed-tensors", 4, False, 128),
        ("int-quantized", 8, True, None),  # a scale per row
        ("awq", 4, False, 32),
        ("gptq", 8, True, 32),
    ],
)
def test_packed_checkpoints_run_in_the_triton_kernels(tmp_path, monkeypatch, layout, bits, symmetric, group_size):
    """Quantized checkpoints (compressed-tensors W4A16 with zero points in groups of 128, W8A8 with
    a scale per row, AWQ, 8-bit GPTQ; tests/model/test_quantization.py checks them against
    transformers) through the GPU's kernels (here under Triton's interpreter): every projection
    stays packed (Triton's grouped form, or int8 rows), and the greedy tokens are those of the CPU
    kernels on the same forms."""
    from conftest import build_checkpoint
    from quantized_files import compressed_checkpoint, gptq_or_awq_checkpoint

    from llama3_dist import LLM, SamplingParams

    source = build_checkpoint("llama", tmp_path / "source", hidden_size=128, intermediate_size=256, num_hidden_layers=1)
    path = tmp_path / "packed"
    if layout == "compressed-tensors":
        compressed_checkpoint(source, path, bits, symmetric, group_size)
    elif layout == "int-quantized":
        compressed_checkpoint(source, path, bits, symmetric, group_size, packing="int-quantized")
    else:
        gptq_or_awq_checkpoint(source, path, layout, bits, symmetric, group_size)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    tokens = {}
    for kernels_path in ("auto", "triton"):
        monkeypatch.setenv("LLAMA3_DIST_KERNELS", kernels_path)
        with LLM(str(path), devices=[DEVICE], dtype="float32", show_progress=False, kv_cache_bytes=4 << 20) as llm:
            layer = llm.engine.executor.worker.model.decoder_layers[0]
            if kernels_path == "triton":
                attention, mlp = layer.self_attn, layer.mlp
                for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj):
                    if group_size is None:  # int8 values with a scale per row: the Triton int8 GEMV
                        assert linear.weight.dtype == torch.int8 and linear.weight_scale is not None
                    else:
                        assert isinstance(linear.grouped, tk.TritonGroupWeights) and linear.grouped.bits == bits
            outputs = llm.generate(prompt_token_ids=[[3, 1, 4, 1, 5, 9]], sampling_params=greedy, use_tqdm=False)
            tokens[kernels_path] = list(outputs[0].outputs[0].token_ids)
    assert tokens["triton"] == tokens["auto"]


def test_fp8_decode_rows_take_the_gemv_and_equal_the_reference(monkeypatch):
    """float8 weights (quantization="fp8"): up to GEMV_MAX_ROWS rows take the GEMV, which rounds
    each row of x to float8 with its own scale inside it, as reference.fp8_linear does; more rows
    take the reference (torch._scaled_mm on GPUs). In float32 the GEMV and the exact float8 product
    (the reference's CPU route, float32 sums) differ only by the order of summing the same exact
    products (x left unrounded would differ by ~1e-2). Hopper's float8 tensor cores sum with fewer
    bits than float32 (H200 run 6: an output of ~50 off by 1.9 in torch._scaled_mm), so on GPUs
    that route is held to 1% of the product's norm."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 products need compute capability 8.9+")
    n, k = 37, 300
    values, scale = ref.quantize_fp8(randn(n, k))
    values, scale = values.to(DEVICE), scale.to(DEVICE)
    chosen_for = {dtype: kernels.select(DEVICE, dtype) for dtype in (F32, BF16)}  # (their checks run here)
    calls = []
    gemv = tk.gemv
    monkeypatch.setattr(tk, "gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or gemv(*a, **kw))
    for dtype, tolerance in ((F32, dict(rtol=1e-5, atol=1e-5)), (BF16, dict(rtol=1e-2, atol=1e-2))):
        chosen = chosen_for[dtype]
        bias = randn(n, dtype=dtype)
        for rows in (1, 2, 4, 5):
            x = randn(rows, k, dtype=dtype) * 3
            got = chosen.fp8_linear(x, values, scale, bias)
            assert got.dtype == dtype
            exact = ref.fp8_linear(x.cpu(), values.cpu(), scale.cpu(), bias.cpu()).float().to(DEVICE)
            if rows <= tk.GEMV_MAX_ROWS or DEVICE == "cpu":
                torch.testing.assert_close(got.float(), exact, **tolerance)
            else:  # torch._scaled_mm's sums, a percent off here and there (as gpu_gemv.py checks it)
                assert ((got.float() - exact).norm() / exact.norm()).item() < 1e-2
        if dtype == F32:  # the rounding of x is the reference's: unrounded x is far from it
            unrounded = x.float() @ (values.float() * scale[:, None]).T + bias.float()
            assert (unrounded - got).abs().max() > 1e-3
    assert calls == [1, 2, 4] * 2  # the GEMV for decode's rows, nothing else


GROUP_QUANTIZERS = {  # the group-quantized kinds the GEMV tests take, by name
    "q8_0": lambda weight: ref.quantize_int8_groups(weight, 32),
    "int4": lambda weight: ref.quantize_int4(weight, 32),
    "int4-g128": lambda weight: ref.quantize_int4(weight, 128),
}


# The 4-bit cases also run the GEMV's nibble-joining variant: ~2 s each under the interpreter, so
# they run in the whole suite, not the fast lane (which keeps 4-bit GEMVs in the tests above).
@pytest.mark.parametrize(
    "kind",
    [
        "dense",
        "int8",
        "q8_0",
        pytest.param("int4", marks=pytest.mark.slow),
        pytest.param("int4-g128", marks=pytest.mark.slow),
    ],
)
def test_decode_rows_take_the_gemv_and_equal_the_dequantized_product(monkeypatch, kind):
    """Up to GEMV_MAX_ROWS rows of x (decode steps; one for dense weights) take the GEMV, more take
    cuBLAS over the weight dequantized in one pass; both give the product of the dequantized
    weight (odd widths, partial groups and tiles, a bias)."""
    n, k = 37, 300
    weight = randn(n, k)
    bias = randn(n, dtype=BF16)
    chosen = kernels.select(DEVICE, BF16)
    if kind == "dense":
        w = weight.to(BF16)
        exact = w.float()
        product = lambda x: tk.linear(x, w, bias)  # noqa: E731
    elif kind == "int8":
        values, scale = ref.quantize_int8(weight)
        exact = values.float() * scale[:, None]
        product = lambda x: chosen.int8_linear(x, values, scale, bias)  # noqa: E731
    else:
        grouped = GROUP_QUANTIZERS[kind](weight)
        exact = ref.dequantize(grouped, F32)
        packed = chosen.pack_grouped(grouped)
        product = lambda x: chosen.grouped_linear(x, packed, bias)  # noqa: E731
    calls = []
    gemv = tk.gemv
    monkeypatch.setattr(tk, "gemv", lambda *a, **kw: calls.append(a[0].shape[0]) or gemv(*a, **kw))
    for rows in (1, 2, 3, 4, 5, 9):
        x = randn(rows, k, dtype=BF16)
        got = product(x).float()
        expected = x.float() @ exact.T + bias.float()
        # bfloat16 output: one rounding of sums of magnitude ~20 (2**-8 of them), plus the GEMM's
        # rounding of each dequantized weight to bfloat16
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=0.15)
    assert calls == ([1] if kind == "dense" else [1, 2, 3, 4])  # the GEMV for decode's rows, nothing else
    if kind.startswith("int4"):  # the GEMV's other 4-bit variant: nibbles joined in registers
        x = randn(3, k, dtype=BF16)
        for join in (0, 1):
            config = (8, 256, 4, 3, join)
            got = tk.gemv(x, packed.words, bias, scales=packed.scales, offsets=packed.offsets, bits=4,
                          group_size=packed.group_size, config=config)  # fmt: skip
            torch.testing.assert_close(got.float(), x.float() @ exact.T + bias.float(), rtol=2e-2, atol=0.15)
    calls.clear()
    monkeypatch.setenv("LLAMA3_DIST_GEMV", "0")
    if kind != "dense":  # LLAMA3_DIST_GEMV=0 keeps the GEMM for every row count
        chosen = kernels.select(DEVICE, BF16)
        if kind == "int8":
            chosen.int8_linear(randn(1, k, dtype=BF16), values, scale, bias)
        else:
            chosen.grouped_linear(randn(1, k, dtype=BF16), packed, bias)
        assert calls == []


def _quantized(kind: str, n: int, k: int):
    """(the weight as gemv takes it, its keyword arguments, the dequantized float32 weight)."""
    weight = randn(n, k)
    if kind == "int8":
        values, scale = ref.quantize_int8(weight)
        return values, dict(scales=scale.reshape(-1, 1), bits=8), values.float() * scale[:, None]
    grouped = GROUP_QUANTIZERS[kind](weight)
    packed = tk.pack_grouped(grouped)
    arguments = dict(scales=packed.scales, offsets=packed.offsets, bits=packed.bits, group_size=packed.group_size)
    return packed.words, arguments, ref.dequantize(grouped, F32)


WORDS_CONFIGS = [(8, 1024, 1, 1, tk.GEMV_WORDS), (32, 256, 4, 1, tk.GEMV_WORDS)]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or tk.gluon is None, reason="the Gluon GEMV runs on CUDA GPUs only")
@pytest.mark.parametrize("kind", ["int8", "q8_0", "int4", "int4-g128"])
def test_words_gemv_equals_the_dequantized_product(kind):
    """The Gluon GEMV over 32-bit words (gemv's GEMV_WORDS variant) for 1 and 3 rows (3: padded
    to 4), a partial tile of rows and of columns (1000 = 7 groups of 128 and 104), a bias; two
    tiles: one with a thread per block of columns, one with threads across rows too. Then the
    dequantizing pass (the words kernel's for 4 bits) against the reference's bfloat16 weight,
    bit for bit."""
    n, k = 37, 1000
    words, arguments, exact = _quantized(kind, n, k)
    bias = randn(n, dtype=BF16)
    for config in WORDS_CONFIGS:
        for rows in (1, 3):
            x = randn(rows, k, dtype=BF16)
            assert tk._takes_words(words, k, arguments["bits"], arguments.get("group_size", 0))
            got = tk.gemv(x, words, bias, config=config, **arguments).float()
            expected = x.float() @ exact.T + bias.float()
            message = f"words GEMV {config}, {rows} rows"
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=0.15, msg=lambda m, at=message: f"{at}: {m}")
    # the dequantizing pass (decode steps of more rows): the reference's values exactly
    dequantized = tk._dequantized(words, arguments["scales"], arguments.get("offsets"), arguments["bits"],
                                  arguments.get("group_size", 0), k, BF16)  # fmt: skip
    assert torch.equal(dequantized, exact.to(BF16))


@pytest.mark.subprocess
@pytest.mark.skipif(tk.gluon is None, reason="this triton has no Gluon (triton.experimental.gluon)")
def test_words_gemv_compiles_for_hopper():
    """The Gluon GEMV and dequantizing pass run on GPUs only; here they are compiled for sm_90 by
    triton's own ptxas (no GPU needed), in a process without TRITON_INTERPRET (the interpreter
    compiles nothing): the GEMV for 4 and 8 bits, 1 and 3 rows, in three tile shapes; the 4-bit
    dequantizing pass."""
    code = """
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from llama3_dist.kernels import triton_kernels as tk
for bits, group, offsets in ((4, 32, True), (8, 0, False)):
    for rows in (1, 3):
        for block_n, block_k, warps in ((8, 1024, 1), (16, 512, 2), (32, 256, 4)):
            rows_p2 = tk._pow2(rows)
            consts = dict(ROWS=rows, ROWS_P2=rows_p2, BITS=bits, GROUP=group, ROW_SCALE=not group,
                          HAS_OFFSET=offsets, HAS_BIAS=True, BLOCK_N=block_n, BLOCKS=block_k // 32,
                          LAYOUT=tk._words_layout(rows_p2, bits, block_n, block_k // 32, warps))
            fn = tk._gemv_words_kernel
            types = dict(x_ptr="*bf16", w_ptr="*i32", scale_ptr="*fp16" if group else "*fp32",
                         offset_ptr="*fp16", bias_ptr="*bf16", out_ptr="*bf16")
            sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
            kernel = triton.compile(GluonASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                    options=dict(num_warps=warps))
            assert kernel.asm["cubin"] and kernel.metadata.shared == 0, (bits, rows, block_n)
consts = dict(GROUP=32, HAS_OFFSET=True, BLOCK_N=16, BLOCKS=8, LAYOUT=tk._dequantize_layout(16, 8, 4))
fn = tk._dequantize_words_kernel
types = dict(w_ptr="*i32", scale_ptr="*fp16", offset_ptr="*fp16", out_ptr="*bf16")
sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
kernel = triton.compile(GluonASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=4))
assert kernel.asm["cubin"]
"""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_linear_kernels_are_checked_before_they_are_trusted(monkeypatch, caplog):
    """select() tries the Triton linear kernels once per device and dtype; where they fail or
    disagree with the exact product, quantized weights take the torch reference (and dense ones
    cuBLAS), with a warning that names the problem."""
    kernels.linear_kernels_work.cache_clear()
    monkeypatch.setattr(logging.getLogger("llama3_dist"), "handlers", [caplog.handler])  # it does not propagate
    try:
        assert kernels.linear_kernels_work(torch.device(DEVICE), F32)
        assert kernels.select(DEVICE, F32).runs_grouped
        kernels.linear_kernels_work.cache_clear()
        monkeypatch.setattr(tk, "grouped_linear", lambda x, weight, bias=None: torch.zeros(x.shape[0], weight.shape[0]))
        chosen = kernels.select(DEVICE, F32)
        assert not chosen.runs_grouped and chosen.grouped_linear is ref.grouped_linear
        assert "failed their check" in caplog.text and "differs from the exact product" in caplog.text
    finally:
        kernels.linear_kernels_work.cache_clear()


# ------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_model_logits_match_torch_path(tmp_path, monkeypatch):
    """A tiny random Llama through Llama3Model: the Triton path gives the torch path's logits
    for a ragged prefill (one sequence prefix-free, one longer than a block) and decode steps."""
    transformers = pytest.importorskip("transformers")
    from llama3_dist import Llama3Model, ReturnLogits, TextContext

    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=2,
        vocab_size=128,
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path)
    prompts = [[3, 17, 99, 5, 64], list(range(40, 60))]

    def run(mode):
        monkeypatch.setenv("LLAMA3_DIST_KERNELS", mode)
        with Llama3Model.from_pretrained(
            tmp_path, devices=[DEVICE], dtype="float32", return_logits=ReturnLogits.ALL, block_size=8, num_kv_blocks=16
        ) as model:
            inputs = model.prepare_initial_token_inputs([TextContext(tokens=list(p)) for p in prompts])
            out = model.execute(inputs)
            logits = [out.logits]
            for step in range(3):
                inputs = model.prepare_next_token_inputs([7 + step, 11 * step], inputs)
                logits.append(model.execute(inputs).logits)
        return logits

    calls = {}
    for name in kernels.TRITON_KERNELS:

        def counted(*args, _name=name, _fn=getattr(tk, name), **kwargs):  # noqa: B008 (binds this loop's kernel)
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(tk, name, counted)
    expected = run("torch")
    assert not calls
    got = run("triton")
    assert set(calls) == set(kernels.TRITON_KERNELS), calls  # every kernel ran (in this process)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_model_logits_match_torch_path(tmp_path, monkeypatch, quantization):
    """Quantized projections through the Triton kernels (weights kept in their integers: the
    prompt's 7 rows dequantized in one pass for cuBLAS, the decode row through the GEMV) give the
    torch path's logits (weights dequantized per call by torch operations)."""
    transformers = pytest.importorskip("transformers")
    from llama3_dist import Llama3Model, ReturnLogits, TextContext

    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        num_hidden_layers=2, vocab_size=128,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path)

    def run(mode):
        monkeypatch.setenv("LLAMA3_DIST_KERNELS", mode)
        with Llama3Model.from_pretrained(
            tmp_path, devices=[DEVICE], dtype="float32", return_logits=ReturnLogits.ALL, block_size=8,
            num_kv_blocks=16, quantization=quantization,
        ) as model:  # fmt: skip
            inputs = model.prepare_initial_token_inputs([TextContext(tokens=[3, 17, 99, 5, 64, 2, 9])])
            logits = [model.execute(inputs).logits]
            inputs = model.prepare_next_token_inputs([7], inputs)
            logits.append(model.execute(inputs).logits)
        return logits

    calls = []

    def spy(name):
        kernel = getattr(tk, name)
        return lambda *a, **kw: calls.append(name) or kernel(*a, **kw)

    for name in ("_dequantized", "gemv"):
        monkeypatch.setattr(tk, name, spy(name))
    expected = run("torch")
    assert not calls
    got = run("triton")
    assert set(calls) == {"_dequantized", "gemv"}  # the prompt's and the decode step's routes
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.subprocess
@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU error path")
def test_cpu_tensors_without_interpreter_fail_clearly():
    code = (
        "import os, torch\n"
        "os.environ['LLAMA3_DIST_KERNELS'] = 'triton'\n"
        "from llama3_dist import kernels\n"
        "try:\n"
        "    kernels.silu_and_mul(torch.randn(2, 8))\n"
        "except RuntimeError as e:\n"
        "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_prefill_grid_from_the_host(monkeypatch):
    """The prefill sizes its grid from max_query_len when the caller gives it (the worker does,
    from the host-side step: no device sync per layer), with the output it gets by reading it
    off the device."""
    k_cache, v_cache, tables, ctx = paged_cache([9, 20], 8, 2, 32, F32, DEVICE, pad_value=0)
    qsl = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    q = randn(10, 4, 32)
    read = tk.prefill_attention(q, k_cache, v_cache, tables, qsl, ctx, 0.2)
    monkeypatch.setattr(torch.Tensor, "max", lambda *a, **k: pytest.fail("max_query_len given: no device read"))
    given = tk.prefill_attention(q, k_cache, v_cache, tables, qsl, ctx, 0.2, max_query_len=6)
    torch.testing.assert_close(given, read, rtol=0, atol=0)
