"""The compiled CPU kernels (llama3_dist/kernels/cpu_kernels.cpp) against the torch reference, for
every instruction set this CPU runs (an AVX-512 host builds and checks the AVX2 and generic
libraries too) and both element types.

They do the reference's arithmetic (float32 math, bfloat16 roundings in the same places), so
bfloat16 outputs must agree to within float32 summation order: almost every element bit for
bit, the rest one bfloat16 step apart; float32 outputs to float32 rounding. Caches and outputs
are poisoned with NaN where nothing may be read or left unwritten.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import subprocess
import sys

import pytest
import torch
from conftest import paged_cache

from llama3_dist import kernels
from llama3_dist.kernels import cpu
from llama3_dist.kernels import reference as ref

BF16, F32 = torch.bfloat16, torch.float32
TURNED_OFF = os.environ.get("LLAMA3_DIST_CPU_KERNELS", "1") == "0"
ISAS = cpu.executable_isas()
if not TURNED_OFF and any(cpu.library(isa) is None for isa in ISAS):
    raise RuntimeError(f"this CPU runs {ISAS} but a CPU kernel library did not build; see the warning above")
built = pytest.mark.skipif(TURNED_OFF, reason="LLAMA3_DIST_CPU_KERNELS=0")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(
    params=[(isa, dtype) for isa in ISAS for dtype in (BF16, F32)],
    ids=lambda p: f"{p[0]}-{str(p[1]).removeprefix('torch.')}",
)
def variant(request):
    """(library, dtype) for every instruction set this CPU runs and both element types."""
    if TURNED_OFF:
        pytest.skip("LLAMA3_DIST_CPU_KERNELS=0")
    isa, dtype = request.param
    return cpu.library(isa), dtype


def randn(*shape, dtype=BF16):
    return torch.randn(*shape).to(dtype)


def assert_matches(got: torch.Tensor, expected: torch.Tensor, exact_fraction: float = 0.99):
    """bfloat16: within one step everywhere, bit-identical nearly everywhere. float32: within
    float32 rounding of a different summation order."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if got.dtype == F32:
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)
        return
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=1e-3)
    same = (got == expected).float().mean().item()
    assert same >= exact_fraction, f"only {same:.4f} of the elements are bit-identical"


@pytest.mark.parametrize("D,residual,weight", [(1024, True, True), (80, False, True), (100, True, False)])
@pytest.mark.parametrize("N", [1, 37])
def test_rms_norm(variant, N, D, residual, weight):
    library, dtype = variant
    x, r = randn(N, D, dtype=dtype), (randn(N, D, dtype=dtype) if residual else None)
    w = (1 + 0.5 * torch.randn(D)).to(dtype) if weight else None
    out, h = library.rms_norm(x, w, 1e-5, r)
    ref_out, ref_h = ref.rms_norm(x, w, 1e-5, r)
    assert torch.equal(h, ref_h)
    assert_matches(out, ref_out)


@pytest.mark.parametrize(
    "d,rot,interleaved,hq,hk",
    [
        (64, 64, False, 4, 4),  # full rotary, Hugging Face layout
        (128, 96, True, 8, 2),  # partial rotary (0.75), GGUF layout
        (96, 48, False, 6, 2),  # partial, rotate-half, half (24) not a multiple of any vector
    ],
)
def test_rotary_embedding(variant, d, rot, interleaved, hq, hk):
    library, dtype = variant
    N, max_pos = 9, 64
    qkv = randn(N, (hq + 2 * hk) * d, dtype=dtype)  # q and k as the model passes them: views into qkv
    expected = qkv.clone()
    inv = 1.0 / (500000 ** (torch.arange(0, rot, 2, dtype=F32) / rot))
    freqs = torch.arange(max_pos, dtype=F32)[:, None] * inv[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    positions = torch.randint(0, max_pos, (N,))

    def views(t):
        return t[:, : hq * d].view(N, hq, d), t[:, hq * d : (hq + hk) * d].view(N, hk, d)

    ref.rotary_embedding(positions, *views(expected), cos_sin, interleaved)
    library.rotary_embedding(positions, *views(qkv), cos_sin, interleaved)
    if dtype == BF16:  # same roundings in the same order: bit for bit, v and the unrotated features included
        assert torch.equal(qkv, expected)
    else:  # float32: the reference's products may be fused differently
        torch.testing.assert_close(qkv, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(qkv[:, (hq + hk) * d :], expected[:, (hq + hk) * d :])


@pytest.mark.parametrize("N,inter", [(1, 3584), (5, 1100), (2, 13)])
def test_silu_and_mul(variant, N, inter):
    library, dtype = variant
    x = randn(N, 2 * inter, dtype=dtype) * 4
    x[0, :3] = torch.tensor([-200.0, 200.0, 0.0])  # exp's range ends: silu gives -0, x and 0
    assert_matches(library.silu_and_mul(x), ref.silu_and_mul(x))


def test_store_kv_cache(variant):
    library, dtype = variant
    N, hq, hk, d, num_blocks, block_size = 11, 4, 2, 64, 6, 4
    qkv = randn(N, (hq + 2 * hk) * d, dtype=dtype)
    k, v = qkv[:, hq * d : (hq + hk) * d].view(N, hk, d), qkv[:, (hq + hk) * d :].view(N, hk, d)
    slots = torch.randperm(num_blocks * block_size)[:N]
    slots[[2, 7]] = -1
    k_cache = torch.full((num_blocks, block_size, hk, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    ek, ev = k_cache.clone(), v_cache.clone()
    ref.store_kv_cache(k, v, ek, ev, slots)
    library.store_kv_cache(k, v, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, ek, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, ev, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "d,hq,hk,block_size,lens,window",
    [
        (64, 16, 4, 16, [33], None),  # the benchmark model's heads, batch of one
        (128, 8, 2, 16, [1, 37, 300], None),  # GQA 4, several sequences, one of one token
        (128, 8, 1, 8, [45, 130, 9], 32),  # GQA 8, sliding window
        (96, 6, 6, 16, [50, 21], 20),  # head_dim 96, no grouping, window
        (72, 6, 2, 16, [5000], None),  # head_dim of no vector multiple; threaded (many keys)
        (64, 14, 2, 16, [70, 5], None),  # GQA 7: query heads in chunks of 4 and 3
    ],
)
def test_paged_decode_attention(variant, d, hq, hk, block_size, lens, window):
    library, dtype = variant
    k_cache, v_cache, tables, ctx = paged_cache(lens, block_size, hk, d, dtype, "cpu", pad_value=0)
    qkv = randn(len(lens), (hq + 2 * hk) * d, dtype=dtype)
    q = qkv[:, : hq * d].view(len(lens), hq, d)  # a strided view, as the model passes it
    scale = d**-0.5
    expected = ref.paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, window)
    got = library.paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, window)
    assert not got.isnan().any()
    assert_matches(got, expected, exact_fraction=0.97)


@pytest.mark.parametrize(
    "d,hq,hk,seqs,window",
    [
        # seqs: (context length, query tokens); fewer queries than context: a prompt after cached tokens
        (64, 9, 3, [(300, 300), (40, 7), (1, 1)], None),  # whole prompts (is_causal), a cached prefix
        (64, 4, 2, [(1300, 1100)], None),  # masked blocks of 1024 query rows and a partial one
        (128, 8, 2, [(90, 90), (70, 20)], 32),  # sliding windows from position 0 and after a prefix
        (64, 6, 6, [(50, 50)], 64),  # a window no shorter than the prompt: is_causal
    ],
)
def test_prefill_attention_through_torch_flash_attention(variant, d, hq, hk, seqs, window):
    """The library's prefill attention (torch's float32 scaled_dot_product_attention, masks
    built for query blocks that do not start at position 0) against the reference's."""
    library, dtype = variant
    lens = [context for context, _ in seqs]
    k_cache, v_cache, tables, ctx = paged_cache(lens, 16, hk, d, dtype, "cpu", pad_value=0)
    q_lens = torch.tensor([0] + [n for _, n in seqs])
    starts = q_lens.cumsum(0).to(torch.int32)
    q = randn(int(q_lens.sum()), hq, d, dtype=dtype)
    expected = ref.prefill_attention(q, k_cache, v_cache, tables, starts, ctx, d**-0.5, window)
    got = library.prefill_attention(q, k_cache, v_cache, tables, starts, ctx, d**-0.5, window)
    assert not got.isnan().any()
    assert_matches(got, expected, exact_fraction=0.97)


def test_decode_attention_threads_split_query_heads_exactly(variant):
    """With fewer (sequence, KV head) tasks than two per thread, the threads take parts of each
    KV head's query heads (3 query heads a KV head: parts of 2 and 1 on two threads, 1 each on
    three): every thread count gives the one-thread output bit for bit."""
    library, dtype = variant
    d, hq, hk, lens = 64, 6, 2, [5000]  # 10000 keys x KV heads: threaded
    k_cache, v_cache, tables, ctx = paged_cache(lens, 16, hk, d, dtype, "cpu", pad_value=0)
    q = randn(len(lens), hq, d, dtype=dtype)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outputs.append(library.paged_decode_attention(q, k_cache, v_cache, tables, ctx, d**-0.5, None))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    expected = ref.paged_decode_attention(q, k_cache, v_cache, tables, ctx, d**-0.5, None)
    assert_matches(outputs[0], expected, exact_fraction=0.97)


@pytest.mark.skipif(
    TURNED_OFF or "avx512" not in ISAS or not {"avx512_vnni", "avx512_bf16"} & cpu._cpu_features(),
    reason="only a CPU with AVX-512 VNNI or BF16 has paths of those instructions to set against plain AVX-512's",
)
def test_avx512_extensions_match_the_plain_avx512_paths(monkeypatch):
    """The avx512 library takes VNNI (the integer GEMV's byte dot products) and AVX-512 BF16
    (decode attention's bfloat16 scores, the bfloat16 GEMV's products, prompt rows' products with
    4-bit panels) where the CPU has them;
    built without either (LLAMA3_DIST_CPU_VNNI=0 LLAMA3_DIST_CPU_BF16=0, as for Skylake-X to Ice
    Lake servers) it runs AVX-512BW's byte products and float multiply-adds instead, which this
    host would otherwise never test. Integer sums are exact either way (panel GEMV outputs
    bit-identical); the scores and the GEMV sum the same products in another order (both
    libraries match the reference)."""
    monkeypatch.setenv("LLAMA3_DIST_CPU_VNNI", "0")
    monkeypatch.setenv("LLAMA3_DIST_CPU_BF16", "0")
    plain, full = cpu.KernelLibrary("avx512"), cpu.library("avx512")
    assert full is not None
    # the prompt rows' dot products are built in exactly where the CPU has the instructions
    assert not plain.bf16_dot_panels and full.bf16_dot_panels == ("avx512_bf16" in cpu._cpu_features())
    d, hq, hk, lens = 64, 9, 3, [70, 300, 5]
    k_cache, v_cache, tables, ctx = paged_cache(lens, 16, hk, d, BF16, "cpu", pad_value=0)
    q = randn(len(lens), hq, d, dtype=BF16)
    expected = ref.paged_decode_attention(q, k_cache, v_cache, tables, ctx, d**-0.5, None)
    for library in (plain, full):
        got = library.paged_decode_attention(q, k_cache, v_cache, tables, ctx, d**-0.5, None)
        assert_matches(got, expected, exact_fraction=0.97)
    w = randn(72, 200, dtype=F32) * 0.05
    for quantized in (ref.quantize_int4(w, 32), quantize_q8_0(w, 32)):
        packed = cpu.pack_grouped(quantized, full.lanes, panels=True)
        x = randn(13, 200, dtype=BF16)
        assert torch.equal(plain.gemv_grouped(x, packed, None), full.gemv_grouped(x, packed, None))
    for rows in (1, 5, 8):  # 1000 features: 31 chunks of 32 and a partial one (dot products from 5 rows)
        x, w = randn(rows, 1000, dtype=BF16), randn(40, 1000, dtype=BF16)
        exact = (x.double() @ w.double().T).to(BF16)
        for library in (plain, full):
            assert_matches(library.gemv(x, w, None), exact, exact_fraction=0.98)
    # Prompt rows through 4-bit panels (x exact): float multiply-adds of dequantized weights, or
    # dot products of 16 + q with pairs of x (AVX-512 BF16); 13 rows of 200 features end in a
    # partial block.
    w = randn(72, 200, dtype=F32) * 0.05
    plain_int4 = ref.quantize_int4(w, 32).plain()
    q4_0 = ref.GroupQuantized(plain_int4.values, plain_int4.scales, plain_int4.scales * -8, 4, 32)
    for quantized in (ref.quantize_int4(w, 32), q4_0):
        packed = cpu.pack_grouped(quantized, full.lanes, panels=True)
        x = randn(13, 200, dtype=BF16)
        exact = (x.double() @ ref.dequantize(quantized).double().T).to(BF16)
        for library in (plain, full):
            assert_matches(library.gemv_grouped(x, packed, None, exact_x=True), exact, exact_fraction=0.98)


@pytest.mark.parametrize(
    "rows,k,n", [(1, 1000, 160), (5, 1024, 160), (8, 72, 160), (13, 1000, 160), (1, 3100, 37), (3, 3100, 37)]
)
def test_gemv_rounds_a_float32_product(variant, rows, k, n):
    """The GEMV computes what a GEMM with float32 accumulation computes, rounded once; k of no
    vector multiple ends with a partial vector; 13 rows take two passes (8 + 5). Rows of 3100
    features are long rows (walked two at a time where vectors are narrower than 64 bytes), and 37
    of them leave a last row alone."""
    library, dtype = variant
    x, w, b = randn(rows, k, dtype=dtype), randn(n, k, dtype=dtype), randn(n, dtype=dtype)
    exact = x.double() @ w.double().T + b.double()
    got = library.gemv(x, w, b)
    if dtype == F32:  # float32 sums of 1000 terms: as close to the exact sum as torch's own GEMM
        torch_error = ((x @ w.T + b).double() - exact).abs().max()
        assert (got.double() - exact).abs().max() <= 4 * torch_error + 1e-6
    else:
        assert_matches(got, exact.to(dtype), exact_fraction=0.98)
    assert library.gemv(x, w.T.contiguous().T, None) is None  # a strided weight is not served


@pytest.mark.parametrize("rows,k,n", [(1, 1000, 160), (13, 67, 160), (2, 6200, 37)])
def test_int8_gemv_is_the_scaled_product(variant, rows, k, n):
    """int8 weights with a float32 scale per row: the scaled float32 product, rounded once (13 rows
    take two passes, k of no block multiple ends with a partial block; rows of 6200 bytes are long
    rows, 37 of them leave a last one alone); torch's int8 kernel, the fallback for many rows,
    agrees."""
    library, dtype = variant
    x, b = randn(rows, k, dtype=dtype), randn(n, dtype=dtype)
    w, scale = ref.quantize_int8(randn(n, k))
    dequantized = w.double() * scale.double()[:, None]
    exact = x.double() @ dequantized.T + b.double()
    got = library.gemv_int8(x, w, scale, b)
    if dtype == F32:  # as close to the exact sum as torch's own float32 GEMM on the same weights
        torch_error = ((x @ dequantized.float().T + b).double() - exact).abs().max()
        assert (got.double() - exact).abs().max() <= 4 * torch_error + 1e-6
    else:
        assert_matches(got, exact.to(dtype), exact_fraction=0.98)
    fallback = ref.int8_weight_linear(x, w, scale, b).double()
    torch.testing.assert_close(fallback, exact, rtol=2e-2 if dtype == BF16 else 1e-4, atol=0.1)
    assert library.gemv_int8(x, w, scale.double(), b) is None  # scales must be float32


def quantize_q8_0(w: torch.Tensor, group_size: int) -> ref.GroupQuantized:
    """Symmetric 8 bits per group (GGUF's Q8_0 when group_size is 32)."""
    n, k = w.shape
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(w.float(), (0, groups * group_size - k)).view(n, groups, group_size)
    scales = (padded.abs().amax(2) / 127).to(torch.float16)
    values = torch.round(padded / scales.float().clamp(min=1e-8)[:, :, None]).clamp(-127, 127)
    return ref.GroupQuantized(values.view(n, -1)[:, :k].to(torch.int8).contiguous(), scales, None, 8, group_size)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (8, 32)])
@pytest.mark.parametrize("rows,n,k", [(1, 160, 1024), (13, 37, 200), (20, 9, 70)])
def test_grouped_gemv_is_the_dequantized_product(variant, bits, group_size, rows, n, k):
    """Group-quantized weights (int4 with offsets, Q8_0-like symmetric 8 bits) multiplied without
    dequantizing: the dequantized product to float32 rounding (k of no block or group multiple
    ends with partial ones; 13 rows take two GEMV passes, 20 the dequantize-then-GEMM route); the
    library's dequantization is bit-identical to the reference's."""
    library, dtype = variant
    w = randn(n, k, dtype=F32) * 0.05
    # this GEMV reads float16 scales: coded ones (int4's) are widened to them at packing
    weight = ref.quantize_int4(w, group_size) if bits == 4 else quantize_q8_0(w, group_size)
    packed = cpu.pack_grouped(weight, library.lanes)
    weight = weight.plain()
    x, b = randn(rows, k, dtype=dtype), randn(n, dtype=dtype)
    exact = x.double() @ ref.dequantize(weight).double().T + b.double()
    got = cpu.grouped_linear(x, packed, b, library)
    if dtype == F32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    else:  # the weights are dequantized in float32 here, rounded to bfloat16 by the reference
        torch.testing.assert_close(got.double(), exact, rtol=2**-7, atol=2e-2)
    assert torch.equal(library.dequantize_grouped(packed, F32), ref.dequantize(weight))
    torch.testing.assert_close(ref.grouped_linear(x.double(), weight, b.double()), exact)


def test_large_weights_pack_and_quantize_a_chunk_of_rows_at_a_time(monkeypatch):
    """Packing and quantizing go a chunk of rows at a time (a whole LM head's int64 and float32
    copies cost ~35 bytes a weight at once): chunks of 7 rows (8: whole panels) and a last, shorter one give
    the same tensors as one pass, in every panel layout, the float GEMV's words, int4's coded
    form (values, scale and offset codes, factors) and the 6-bit head's groups."""
    w = randn(100, 200, dtype=F32) * 0.05
    int4, int6, int8 = ref.quantize_int4(w, 32), ref.quantize_int6_groups(w), quantize_q8_0(w, 32)
    assert int4.factors is not None and int4.offsets is not None  # every field of the coded form

    def packed_forms() -> list[torch.Tensor]:
        panels = [cpu.pack_grouped(g, 8, panels=True, x_digits=d) for g, d in ((int4, 1), (int6, 2), (int8, 2))]
        words = [cpu.pack_grouped(g, 8) for g in (int4, int8)]
        return [p.words for p in panels + words]

    def quantized_forms() -> list[torch.Tensor]:
        forms = (ref.quantize_int4(w, 32), ref.quantize_int4(w, 128), ref.quantize_int6_groups(w))
        return [t for g in forms for t in (g.values, g.scales, g.offsets, g.factors) if t is not None]

    whole, whole_quantized = packed_forms(), quantized_forms()
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 7 * 200)  # 7 rows a chunk (8 where 8 lanes make a panel)
    for chunked, one_pass in zip(packed_forms() + quantized_forms(), whole + whole_quantized, strict=True):
        assert torch.equal(chunked, one_pass)


@pytest.mark.parametrize(
    "bits,group_size,x_digits,form",
    [
        (4, 32, 1, "coded"),
        (4, 128, 1, "coded"),
        (4, 32, 1, "float16"),
        (4, 32, 1, "symmetric"),
        (8, 32, 1, "symmetric"),
        (8, 224, 1, "symmetric"),
        (8, 32, 2, "symmetric"),
        (6, 32, 2, "symmetric"),
    ],
)
@pytest.mark.parametrize("rows,n,k", [(1, 160, 1024), (9, 37, 200)])
def test_panel_gemv_is_the_product_with_x_in_int8_blocks(variant, bits, group_size, x_digits, form, rows, n, k):
    """4- and 8-bit weights in panels (bfloat16 models): x quantized to int8 per block of 32 and
    integer dot products, so within x's rounding of the dequantized product (about 1% of its norm
    on random x); the panels dequantize bit-identically to the reference. Groups of 224 are
    whole rows of 200 (int8 with a scale per row). 4 bits with coded scales (int4's: 8-bit codes,
    a factor per 8 groups; k 1024 in groups of 128 has one run, 200 in groups of 32 a partial
    one), with float16 ones (GGUF Q4_1) and symmetric (GGUF Q4_0: offsets of -8 scales, packed
    without offsets). x_digits 2 (the LM head's "panels8x15"): x in two int8
    digits, 15 bits a block, so within a 128 times finer rounding; 6-bit weights (int4 models'
    LM head) run only so."""
    library, dtype = variant
    w = randn(n, k, dtype=F32) * 0.05
    if bits == 8:
        weight = quantize_q8_0(w, group_size)
    elif bits == 6:  # int4 models' LM head: (u - 32) * scale, u's high 2 bits in words of their own
        weight = ref.quantize_int6_groups(w, group_size)
    elif form == "symmetric":  # Q4_0's form: w = (q - 8) * scale
        weight = ref.quantize_int4(w, group_size).plain()
        weight = ref.GroupQuantized(weight.values, weight.scales, weight.scales * -8, 4, group_size)
    else:
        weight = ref.quantize_int4(w, group_size)
        weight = weight if form == "coded" else weight.plain()
    packed = cpu.pack_grouped(weight, library.lanes, panels=True, x_digits=x_digits)
    assert (packed.offsets is None) == (form != "float16")
    assert (packed.factors is None) == (form != "coded")
    assert torch.equal(library.dequantize_grouped(packed, F32), ref.dequantize(weight))
    x, b = randn(rows, k, dtype=dtype), randn(n, dtype=dtype)
    exact = x.double() @ ref.dequantize(weight).double().T + b.double()
    got = library.gemv_grouped(x, packed, b).double()
    output_rounding = 2**-8 if dtype == BF16 else 0.0
    assert (got - exact).norm() <= ((0.03 if x_digits == 1 else 3e-4) + output_rounding) * exact.norm()
    # each x rounded in its block moves a product by at most half a step of the block's scale
    blocks = torch.nn.functional.pad(x.double(), (0, -k % 32)).view(rows, -1, 32)
    step = blocks.abs().amax(-1) / (127 if x_digits == 1 else 127 * 128)
    bound = 0.5 * step.repeat_interleave(32, 1)[:, :k] @ ref.dequantize(weight).double().abs().T
    rounding = exact.abs() * (2**-8 if dtype == BF16 else 1e-6) + 1e-5
    assert ((got - exact).abs() <= bound + rounding).all()


@pytest.mark.parametrize(
    "bits,group_size,form",
    [
        (4, 32, "coded"),
        (4, 128, "coded"),
        (4, 32, "float16"),
        (4, 32, "symmetric"),
        (8, 32, "symmetric"),
        (8, 224, "symmetric"),
    ],
)
@pytest.mark.parametrize("rows,n,k", [(1, 160, 1024), (13, 37, 200)])
def test_panel_gemv_with_x_exact_is_the_dequantized_product(variant, bits, group_size, form, rows, n, k):
    """Prompt rows through panel weights (exact_x): the weights dequantized in registers times x
    in float32, so the dequantized product to float32 rounding, x unrounded (the int8 blocks'
    rounding would be ~1% of the norm, the test above); 13 rows take two passes."""
    library, dtype = variant
    w = randn(n, k, dtype=F32) * 0.05
    if bits == 8:
        weight = quantize_q8_0(w, group_size)
    elif form == "symmetric":  # Q4_0's form: w = (q - 8) * scale, packed without offsets
        weight = ref.quantize_int4(w, group_size).plain()
        weight = ref.GroupQuantized(weight.values, weight.scales, weight.scales * -8, 4, group_size)
    else:
        weight = ref.quantize_int4(w, group_size)
        weight = weight if form == "coded" else weight.plain()
    packed = cpu.pack_grouped(weight, library.lanes, panels=True)
    x, b = randn(rows, k, dtype=dtype), randn(n, dtype=dtype)
    dequantized = ref.dequantize(weight).double()
    exact = x.double() @ dequantized.T + b.double()
    got = library.gemv_grouped(x, packed, b, exact_x=True).double()
    scale = x.double().abs() @ dequantized.abs().T + b.double().abs()  # float32 sums err relative to this
    rounding = exact.abs() * (2**-8 if dtype == BF16 else 0.0)
    assert ((got - exact).abs() <= rounding + 1e-5 * scale).all()
    with pytest.raises(ValueError, match="exact_x: panels4 or panels8 weights only"):
        library.gemv_grouped(x, cpu.pack_head(ref.quantize_int6_groups(w, 32), library.lanes, True), b, exact_x=True)


@pytest.mark.parametrize("bits", [4, 8])
def test_panels_stay_in_gemv_passes_up_to_their_crossover(variant, bits):
    """In decode steps grouped_linear keeps panel weights in the integer GEMV well past the
    float GEMV's 16 rows (dequantizing the whole weight per call made batches of 16-63 sequences
    10x slower than 8), and widens them for a GEMM from the measured crossover on (never where
    the GEMM is a float32 one); prompt rows are never rounded to int8: the GEMV with x exact up
    to their own crossover (4-bit panels' further where AVX-512 BF16 multiplies them), widened past it."""
    library, dtype = variant
    weight = (
        ref.quantize_int4(randn(40, 96, dtype=F32), 32) if bits == 4 else quantize_q8_0(randn(40, 96, dtype=F32), 32)
    )
    packed = cpu.pack_grouped(weight, library.lanes, panels=True)
    native = dtype == F32 or cpu.native_gemm(dtype)
    widen_from = cpu.PANEL_WIDEN_MIN_ROWS if native else None
    exact_from = cpu.prompt_panel_widen_rows(dtype, bits, library)
    if bits == 4 and dtype == BF16 and library.bf16_dot_panels:  # the dot products' crossover
        assert exact_from == cpu.EXACT_DOT_PANEL_WIDEN_MIN_ROWS
    else:
        assert exact_from == (cpu.EXACT_PANEL_WIDEN_MIN_ROWS if native else cpu.EXACT_PANEL_WIDEN_MIN_ROWS_SLOW_GEMM)
    crossovers = (cpu.PANEL_WIDEN_MIN_ROWS, exact_from)
    for rows in (1, cpu.WIDEN_MIN_ROWS + 4, *(c + d for c in crossovers for d in (-1, 0))):
        x = randn(rows, 96, dtype=dtype)
        widened = cpu.linear(x, library.dequantize_grouped(packed, dtype))
        with cpu.decode_rows(True):
            got = cpu.grouped_linear(x, packed, None, library)
        if widen_from is None or rows < widen_from:
            assert torch.equal(got, library.gemv_grouped(x, packed, None)), rows
        else:
            assert torch.equal(got, widened), rows
        # prompt rows (outside decode_rows, or in a step that is not one) keep x exact
        prompt = library.gemv_grouped(x, packed, None, exact_x=True) if rows < exact_from else widened
        assert torch.equal(cpu.grouped_linear(x, packed, None, library), prompt), rows
        with cpu.decode_rows(False):
            assert torch.equal(cpu.grouped_linear(x, packed, None, library), prompt), rows


@pytest.mark.parametrize(
    "layout,exact_x",
    [(layout, exact) for layout in ("coded4", "q4_1", "q4_0", "q8_0") for exact in (False, True)]
    + [("head8x15", False), ("head6x15", False)],  # the heads' x is always in 15 bits
)
def test_panel_gemv_takes_every_row_in_one_call(variant, layout, exact_x):
    """The panel GEMVs take many rows in one call (each panel read once, multiplied into groups
    of up to 8 rows, the last group padded with zero rows that are never stored): every row's
    result is bit-identical to the same row in a call of at most 8 rows (a row's sums do not
    depend on the rows beside it), for row counts that split evenly (16), unevenly (9: groups of
    5 and a padding row; 37: 5 groups of 8, 3 padding rows) and a batch of 64 decode rows."""
    library, dtype = variant
    w = randn(72, 200, dtype=F32) * 0.05
    quantized = {
        "coded4": lambda: ref.quantize_int4(w, 32),
        "q4_1": lambda: ref.quantize_int4(w, 32).plain(),
        "q4_0": lambda: ref.GroupQuantized(
            *(lambda p: (p.values, p.scales, p.scales * -8))(ref.quantize_int4(w, 32).plain()), 4, 32
        ),
        "q8_0": lambda: quantize_q8_0(w, 32),
        "head8x15": lambda: quantize_q8_0(w, 32),
        "head6x15": lambda: ref.quantize_int6_groups(w, 32),
    }[layout]()
    x_digits = 2 if layout.startswith("head") else 1
    packed = cpu.pack_grouped(quantized, library.lanes, panels=True, x_digits=x_digits)
    b = randn(72, dtype=dtype)
    for rows in (9, 16, 37, 64):
        x = randn(rows, 200, dtype=dtype)
        whole = library.gemv_grouped(x, packed, b, exact_x=exact_x)
        eights = [library.gemv_grouped(x[i : i + 8], packed, b, exact_x=exact_x) for i in range(0, rows, 8)]
        assert torch.equal(whole, torch.cat(eights)), rows


def test_x_in_15_bits_takes_8_bit_weights():
    weight = ref.quantize_int4(randn(32, 64, dtype=F32), 32)
    with pytest.raises(ValueError, match="15 bits takes 6- or 8-bit weights, not 4-bit"):
        cpu.pack_grouped(weight, 16, panels=True, x_digits=2)
    assert cpu.pack_head(weight, 16, integer_gemv=True).layout == "q4"  # the float GEMV, x exact
    assert cpu.pack_head(quantize_q8_0(randn(32, 64, dtype=F32), 32), 16, integer_gemv=True).layout == "panels8x15"
    six = ref.quantize_int6_groups(randn(32, 64, dtype=F32))
    assert cpu.pack_head(six, 16, integer_gemv=True).layout == "panels6x15"
    with pytest.raises(ValueError, match="6-bit weights run with x in 15 bits"):
        cpu.pack_grouped(six, 16, panels=True)
    float_head = cpu.pack_head(six, 16, integer_gemv=False)  # as 8-bit words, the same values
    assert float_head.layout == "q8" and torch.equal(float_head.words, cpu.pack_grouped(six.plain(), 16).words)


@built
@pytest.mark.parametrize("vocab,words", [(70, 2), (70, 3), (4096, 128), (1000, 40)])
def test_token_bitmask_kernels(variant, vocab, words):
    """Structured outputs' masks read from packed words: the refused tokens (bit clear, or past
    the words) become -inf in the chosen rows only, and the allowed ids come out ascending."""
    library, _dtype = variant
    import numpy as np

    rng = np.random.default_rng(vocab + words)
    densities = [0.0, 0.002, 0.5, 0.999, 1.0]  # none, a few, half, nearly all, every token allowed
    bits = np.stack([rng.random(words * 32) < d for d in densities])
    packed = np.packbits(bits, axis=1, bitorder="little").view(np.int32)
    logits = torch.randn(7, vocab)
    rows = np.array([6, 0, 3, 2, 4])
    got = logits.clone()
    library.apply_token_bitmask(got, rows, packed)
    expected = logits.clone()
    refused = ~np.pad(bits, ((0, 0), (0, max(0, vocab - words * 32))))[:, :vocab]
    for j, row in enumerate(rows):
        expected[row, torch.from_numpy(refused[j])] = float("-inf")
    assert torch.equal(got, expected)
    for j in range(len(densities)):
        allowed = np.flatnonzero(bits[j][:vocab])
        ids = library.token_bitmask_ids(packed[j], vocab, int(bits[j].sum()))
        assert ids.tolist() == allowed.tolist()
    with pytest.raises(ValueError, match="do not fit logits of 7 rows"):
        library.apply_token_bitmask(got, np.array([0, 1, 2, 3, 7]), packed)


@pytest.mark.parametrize("dtype", [BF16, F32, torch.float16])
@pytest.mark.parametrize("rows", [1, 12, 40])
def test_linear_routes(dtype, rows):
    """kernels.linear: the GEMV for few rows of bfloat16/float32 (one pass where torch's half GEMM
    is native: 12 rows go either way), torch (half precision widened to float32 where its half
    GEMM is not native) for the rest; one result either way."""
    x, w, b = randn(rows, 1000, dtype=dtype), randn(160, 1000, dtype=dtype), randn(160, dtype=dtype)
    expected = (x.double() @ w.double().T + b.double()).to(dtype)
    with torch.inference_mode():  # the worker's mode; the scratch buffer then serves both
        got = kernels.linear(x, w, b)
    if dtype == torch.float16:
        torch.testing.assert_close(got, expected, rtol=2**-10, atol=1e-2)
    else:
        assert_matches(got, expected, exact_fraction=0.98)


@built
def test_dispatch(monkeypatch):
    """bfloat16 and float32 CPU tensors take the compiled kernels of the selected instruction set;
    float16, or LLAMA3_DIST_KERNELS=torch, the reference; a bad LLAMA3_DIST_CPU_ISA is an error
    that names it and what is accepted."""
    x = randn(3, 64)
    monkeypatch.setenv("LLAMA3_DIST_KERNELS", "auto")
    assert kernels._impl(x) is cpu.library(cpu.host_isa())
    assert kernels._impl(x.float()) is cpu.library(cpu.host_isa())
    assert kernels._impl(x.half()) is ref
    monkeypatch.setenv("LLAMA3_DIST_CPU_ISA", ISAS[-1])
    assert kernels._impl(x).isa == ISAS[-1]
    monkeypatch.setenv("LLAMA3_DIST_CPU_ISA", "avx1024")
    with pytest.raises(ValueError, match=r"LLAMA3_DIST_CPU_ISA='avx1024'.*auto\|avx512\|avx2\|generic"):
        kernels.silu_and_mul(x)
    monkeypatch.delenv("LLAMA3_DIST_CPU_ISA")
    monkeypatch.setenv("LLAMA3_DIST_KERNELS", "torch")
    assert kernels._impl(x) is ref


@built
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_model_matches_torch_path_and_transformers(tmp_path, monkeypatch, dtype):
    """A model through Llama3Model: the compiled kernels give the torch path's logits (prefill,
    then decode steps) to within the dtype's rounding, and transformers' on the same weights."""
    transformers = pytest.importorskip("transformers")
    from llama3_dist import Llama3Model, ReturnLogits, TextContext

    config = transformers.LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        num_hidden_layers=2,
        vocab_size=256,
    )
    torch_dtype = getattr(torch, dtype)
    hf = transformers.LlamaForCausalLM(config).to(torch_dtype).eval()
    hf.save_pretrained(tmp_path)
    prompts = [[3, 17, 99, 5, 64], list(range(40, 60))]
    steps = [[7 + step, 11 * step] for step in range(4)]

    def run(mode, fused="1"):
        monkeypatch.setenv("LLAMA3_DIST_KERNELS", mode)
        monkeypatch.setenv("LLAMA3_DIST_CPU_FUSED", fused)
        with Llama3Model.from_pretrained(
            tmp_path, devices=["cpu"], dtype=dtype, return_logits=ReturnLogits.ALL, block_size=8, num_kv_blocks=16
        ) as model:
            inputs = model.prepare_initial_token_inputs([TextContext(tokens=list(p)) for p in prompts])
            logits = [model.execute(inputs).logits]
            for tokens in steps:
                inputs = model.prepare_next_token_inputs(tokens, inputs)
                logits.append(model.execute(inputs).logits)
        return logits

    def close(got, expected):
        if dtype == "float32":
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
            assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9

    calls = []
    library = cpu.library()
    monkeypatch.setattr(
        library, "paged_decode_attention", lambda *a, _f=library.paged_decode_attention: calls.append(1) or _f(*a)
    )
    expected = run("torch")
    assert not calls
    per_kernel = run("auto", fused="0")
    assert len(calls) == len(steps) * config.num_hidden_layers
    got = run("auto")  # each decoder-layer half one call: bit-identical to the per-kernel path
    for g, e, k in zip(got, expected, per_kernel):
        assert torch.equal(g, k)
        close(g, e)
    with torch.no_grad():  # transformers on each whole sequence: prefill rows, then one row per step
        full = [hf(torch.tensor([p + [s[b] for s in steps]])).logits[0].float() for b, p in enumerate(prompts)]
    close(got[0], torch.cat([full[b][: len(p)] for b, p in enumerate(prompts)]))
    for i in range(len(steps)):
        close(got[1 + i], torch.stack([full[b][len(p) + i] for b, p in enumerate(prompts)]))


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.subprocess
def test_torch_fallback_without_the_library():
    """LLAMA3_DIST_CPU_KERNELS=0 (as without a compiler): one warning naming the reason and its
    cost, then the torch reference for every kernel, with the same results."""
    code = (
        "import logging, torch\n"
        "from llama3_dist import kernels\n"
        "from llama3_dist.kernels import cpu, reference\n"
        "logging.basicConfig()\n"
        "for dtype in (torch.bfloat16, torch.float32, torch.float16):\n"
        "    x = torch.randn(3, 64).to(dtype); w = torch.randn(32, 64).to(dtype)\n"
        "    assert kernels._impl(x) is reference and cpu.library() is None\n"
        "    expected = (x.float() @ w.float().T).to(dtype)\n"
        "    torch.testing.assert_close(kernels.linear(x, w), expected, rtol=2 ** -7, atol=1e-2)\n"
    )
    done = _run_python(code, LLAMA3_DIST_CPU_KERNELS="0", LLAMA3_DIST_KERNELS="auto")
    assert done.stderr.count("LLAMA3_DIST_CPU_KERNELS=0") == 1, done.stderr
    assert "slower" in done.stderr


@pytest.mark.subprocess
@pytest.mark.skipif(cpu.host_isa() not in ("avx512", "avx2"), reason="needs an x86-64 CPU with AVX2")
def test_held_to_avx2(tmp_path):
    """torch and oneDNN held to AVX2, as on most laptops and pre-Zen-4 AMD servers: the AVX2 library
    is chosen, half-precision GEMMs are not native, and bfloat16 and float16 models run (one row
    and many) where oneDNN's bfloat16 inner product does not exist."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=2,
        vocab_size=128,
    )
    transformers.LlamaForCausalLM(config).to(BF16).eval().save_pretrained(tmp_path)
    code = (
        "import torch\n"
        "from llama3_dist import LLM, SamplingParams\n"
        "from llama3_dist.kernels import cpu\n"
        "assert cpu.host_isa() == 'avx2', cpu.host_isa()\n"
        "assert not cpu.native_gemm(torch.bfloat16) and not cpu.native_gemm(torch.float16)\n"
        f"for dtype in ('bfloat16', 'float16'):\n"
        f"    with LLM({str(tmp_path)!r}, devices=['cpu'], dtype=dtype, kv_cache_bytes=1 << 24) as llm:\n"
        "        outs = llm.generate(prompt_token_ids=[list(range(3, 40)), [5]],\n"
        "                            sampling_params=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))\n"
        "        assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]\n"
    )
    _run_python(code, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", LLAMA3_DIST_KERNELS="auto")


def fused_and_per_kernel_logits(
    monkeypatch, path, steps: int, prompts=((3, 4, 5, 6, 7), tuple(range(10, 40))), **load
) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """The logits of a prefill and `steps` decode steps of two sequences (across block
    boundaries) with the fused layers on (all in one call with the LM head: one rank), whether they were used, and
    the logits with them off; one call per half (what tensor-parallel ranks run) is checked to
    give the one-call logits exactly."""
    from llama3_dist import Llama3Model, ReturnLogits, TextContext

    def run(fused_env):
        monkeypatch.setenv("LLAMA3_DIST_CPU_FUSED", fused_env)
        with Llama3Model.from_pretrained(
            path, devices=["cpu"], block_size=8, return_logits=ReturnLogits.ALL, num_kv_blocks=32, **load
        ) as model:
            inputs = model.prepare_initial_token_inputs([TextContext(tokens=list(p)) for p in prompts])
            logits = [model.execute(inputs).logits]
            for step in range(steps):
                inputs = model.prepare_next_token_inputs([7 + step + 4 * i for i in range(len(prompts))], inputs)
                logits.append(model.execute(inputs).logits)
            transformer = model.executor.worker.model
            assert (transformer._fused_stack is not None) == (bool(transformer._fused) and fused_env == "1")
            # the stack runs the LM head too (dense, or the 6/8-bit panels of quantized models)
            assert transformer._fused_stack is None or transformer._fused_stack.head is not None
            # and looks the token rows up itself (no embedding multiplier in these architectures)
            assert transformer._fused_stack is None or transformer._fused_stack.embedding is not None
            return torch.cat(logits), bool(transformer._fused)

    got, used = run("1")
    halves, _ = run("halves")
    expected, unused = run("0")
    assert not unused
    assert torch.equal(halves, got)
    return got, used, expected


@built
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize(
    "arch,fused",
    [("llama", True), ("mistral", True), ("qwen2", True), ("phi3", True), ("granite", False), ("olmo", False)],
)
def test_fused_decode_is_bit_identical(checkpoints, monkeypatch, arch, fused, dtype):
    """Decode steps with each layer half as one library call give exactly the per-kernel path's
    logits (same kernels, same order): GQA, sliding windows (mistral), q/k/v biases (qwen2),
    partial rotary (phi3), across block boundaries; architectures the fused halves do not cover
    (Granite's multipliers, OLMo's LayerNorm and clip_qkv) keep the per-kernel path."""
    got, used, expected = fused_and_per_kernel_logits(monkeypatch, checkpoints[arch], 20, dtype=dtype)
    assert used == fused
    assert torch.equal(got, expected)


@built
@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_fused_decode_of_quantized_layers_is_bit_identical(checkpoints, monkeypatch, quantization):
    """bfloat16 layers quantized into the integer GEMV's panels run fused too, exactly as the
    per-kernel path (where the library has byte dot products; the others keep the per-kernel
    path)."""
    got, used, expected = fused_and_per_kernel_logits(
        monkeypatch, checkpoints["llama"], 12, dtype="bfloat16", quantization=quantization
    )
    assert used == cpu.library().integer_dot
    assert torch.equal(got, expected)


@built
@pytest.mark.parametrize("quantization", [None, "int4", "int8"])
def test_decode_steps_of_many_sequences_run_in_one_stack_call(checkpoints, monkeypatch, quantization):
    """A decode step of more sequences than a GEMV tile takes (here 19: three groups of 7 rows for
    the panels, of 8 for the dense GEMV, the last padded) runs through the fused stack in one call
    where the per-kernel path would run the same GEMVs (dense bfloat16 weights: below
    dense_gemv_rows; panels: on hosts with byte dot products), with exactly the per-kernel path's
    logits: the stack's rows, norms, attention and head are the per-kernel path's, and a row's
    sums do not depend on the rows beside it."""
    calls: list[int] = []
    real = cpu.FusedDecodeStack.__call__

    def spy(self, x, step, kv_caches, tokens=None, prompt=False):
        if not prompt:  # the prompts' step (90 rows) may run in the prompt mode too (test_short_prompts)
            calls.append(step.batch)
        return real(self, x, step, kv_caches, tokens=tokens, prompt=prompt)

    monkeypatch.setattr(cpu.FusedDecodeStack, "__call__", spy)
    prompts = [tuple(range(3 + i, 5 + i + i % 7)) for i in range(19)]  # 2 to 8 tokens: 29 of the 32 blocks
    load = {"quantization": quantization} if quantization else {}
    got, _, expected = fused_and_per_kernel_logits(
        monkeypatch, checkpoints["llama"], 4, prompts=prompts, dtype="bfloat16", **load
    )
    stacked = cpu.library().integer_dot if quantization else cpu.dense_gemv_rows(torch.bfloat16) > 19
    assert calls == ([19] * 4 if stacked else [])
    assert torch.equal(got, expected)


@built
def test_first_positions_of_dense_models_run_fused(checkpoints, monkeypatch):
    """Prompts of one token each are a decode-shaped step of first positions. Integer GEMVs keep
    those rows exact (test_quantization), but dense layers never round x: such a step runs in
    the fused stack too (a model's first token at a decode step's cost), exactly as the
    per-kernel path."""
    calls: list[int] = []
    real = cpu.FusedDecodeStack.__call__

    def spy(self, x, step, kv_caches, tokens=None, prompt=False):
        calls.append(step.batch)
        assert not prompt  # dense layers round nothing: decode mode, with the head
        return real(self, x, step, kv_caches, tokens, prompt)

    monkeypatch.setattr(cpu.FusedDecodeStack, "__call__", spy)
    got, used, expected = fused_and_per_kernel_logits(
        monkeypatch, checkpoints["llama"], 3, prompts=((3,), (9,)), dtype="bfloat16"
    )
    assert used and calls == [2] * 4  # the prompts' step and the 3 decode steps, with fusion on
    assert torch.equal(got, expected)


@built
def test_first_positions_of_quantized_models_run_exact_in_the_stack(checkpoints, monkeypatch):
    """1-token prompts of an int4 model: the stack's prompt mode multiplies their rows exact, as
    the per-kernel path does (same kernels: bit-identical), and leaves the head to it."""
    got, used, expected = fused_and_per_kernel_logits(
        monkeypatch, checkpoints["llama"], 3, prompts=((3,), (9,)), dtype="bfloat16", quantization="int4"
    )
    assert used == cpu.library().integer_dot
    assert torch.equal(got, expected)


@built
@pytest.mark.parametrize(
    "dtype,quantization,second",
    [("float32", None, 5), ("bfloat16", "int4", 5), ("bfloat16", "int4", 17), ("bfloat16", "int4", 97)],
)
def test_short_prompts_run_in_the_stack(checkpoints, monkeypatch, dtype, quantization, second):
    """Prompt steps of at most 8 rows run in the stack's prompt mode, and of more where every weight
    is in panels (here 3 + 17 rows: three groups of 7; 3 + 97 where 4-bit prompt rows stay exact
    past 64, as with AVX-512 BF16's dot products): a row per token with its own position, slot,
    block table and context (causal), the keys and values of all stored first, x exact.
    Against the per-kernel path (torch's prefill attention there, the library's decode attention
    here): the prompt's logits within float rounding, then the same greedy tokens."""
    from llama3_dist import Llama3Model, ReturnLogits, TextContext

    if quantization and not cpu.library().integer_dot:
        pytest.skip("no integer GEMV here: int4 rounds nothing")
    calls: list[tuple[int, bool]] = []
    real = cpu.FusedDecodeStack.__call__

    def spy(self, x, step, kv_caches, tokens=None, prompt=False):
        calls.append((step.batch, prompt))
        return real(self, x, step, kv_caches, tokens, prompt)

    monkeypatch.setattr(cpu.FusedDecodeStack, "__call__", spy)

    def run(fused_env):
        monkeypatch.setenv("LLAMA3_DIST_CPU_FUSED", fused_env)
        load = {"quantization": quantization} if quantization else {}
        with Llama3Model.from_pretrained(
            checkpoints["llama"],
            devices=["cpu"],
            dtype=dtype,
            block_size=4,
            num_kv_blocks=32,
            return_logits=ReturnLogits.ALL,
            **load,
        ) as model:
            # 3 + `second` rows, across blocks of 4
            contexts = [TextContext(tokens=[3, 4, 5]), TextContext(tokens=list(range(9, 9 + second)))]
            inputs = model.prepare_initial_token_inputs(contexts)
            prompt_logits = model.execute(inputs).logits
            last, tokens = prompt_logits[[2, 2 + second]], []
            for _ in range(6):
                tokens.append(last.argmax(-1).tolist())
                inputs = model.prepare_next_token_inputs(tokens[-1], inputs)
                last = model.execute(inputs).logits
            return prompt_logits, tokens

    rows = 3 + second
    in_stack = not quantization or rows < cpu.prompt_panel_widen_rows(torch.bfloat16, 4, cpu.library())
    got, got_tokens = run("1")
    prompt_calls = [(rows, True)] if in_stack else []  # else the per-kernel path's (widened) prompt
    assert calls[: len(prompt_calls)] == prompt_calls and calls[len(prompt_calls) :] == [(2, False)] * 6
    calls.clear()
    expected, expected_tokens = run("0")
    assert calls == []
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == "float32" else {"atol": 0.1, "rtol": 0.05}
    torch.testing.assert_close(got, expected, **tolerance)
    assert got_tokens == expected_tokens


@built
def test_fused_embedding_refuses_tokens_outside_the_table(checkpoints):
    """The stack looks token rows up itself: an id outside the table is refused before anything
    runs, naming it (the engine checks prompts first; this guards the library's reads)."""
    from llama3_dist import Llama3Model, TextContext

    with Llama3Model.from_pretrained(
        checkpoints["llama"], devices=["cpu"], dtype="bfloat16", block_size=8, num_kv_blocks=8
    ) as model:
        inputs = model.prepare_initial_token_inputs([TextContext(tokens=[3, 4])])
        model.execute(inputs)
        model.execute(model.prepare_next_token_inputs([5], inputs))  # a decode step builds the stack
        worker = model.executor.worker
        stack = worker.model._fused_stack
        assert stack is not None and stack.embedding is not None
        rows = stack.embedding.shape[0]
        step, _keep = cpu.FusedDecodeLayer.step(
            torch.tensor([3]),
            torch.tensor([3]),
            torch.tensor([[0]], dtype=torch.int32),
            torch.tensor([4], dtype=torch.int32),
            worker.cos_sin,
        )
        for bad in (rows, -1):
            with pytest.raises(ValueError, match=rf"token ids \[{bad}\] are outside the embedding's {rows} rows"):
                stack(None, step, worker.kv_caches, tokens=torch.tensor([bad]))


TINY_SOURCE = """
#define LLAMA3_DIST_PARTS 3  // cpu.py reads this line
extern "C" {
#if LLAMA3_DIST_PART == 0
int first() { return VECTOR_BYTES; }
#elif LLAMA3_DIST_PART == 1
int second() { return 2; }
#else
int third() { return 3; }
#endif
}
"""


def test_library_builds_once_in_parts(tmp_path, monkeypatch):
    """The library is compiled as LLAMA3_DIST_PARTS translation units and linked into one: every
    part's entry points are in it. Threads that ask for it at once into an empty cache (as the
    ranks of a group do) build it once: the others wait for that build and load it."""
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    monkeypatch.setattr(cpu, "SOURCE", source)
    monkeypatch.setenv("LLAMA3_DIST_CACHE", str(tmp_path / "cache"))
    compiled = []
    real_compile = cpu._compile
    monkeypatch.setattr(cpu, "_compile", lambda *args: compiled.append(args[-1]) or real_compile(*args))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: cpu.build("generic"), range(3)))
    assert len(set(paths)) == 1 and compiled == [3]
    library = ctypes.CDLL(str(paths[0]))
    assert (library.first(), library.second(), library.third()) == (16, 2, 3)
    assert [p.name for p in paths[0].parent.iterdir() if p.name.startswith(".building-")] == []

    source.write_text(TINY_SOURCE.replace("return 2;", "return 2 +;"))  # a new source that does not compile
    with pytest.raises(RuntimeError, match=r"failed to build tiny\.cpp for generic:[\s\S]*expected"):
        cpu.build("generic")
